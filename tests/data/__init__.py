"""Tests of milora_vlm/data/ and the data_prep tools."""
