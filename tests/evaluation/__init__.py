"""Tests of milora_vlm/evaluation/."""
