"""Tests of milora_vlm/train/."""
