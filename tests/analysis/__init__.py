"""Tests of milora_vlm/analysis/."""
