"""Tests of milora_vlm/milora/ (and milora_vlm/dist.py, which it uses)."""
