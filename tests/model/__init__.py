"""Tests of milora_vlm/model/."""
