"""Tests of milora_vlm/config/."""
