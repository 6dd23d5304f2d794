"""Tests of milora_vlm/demo/."""
