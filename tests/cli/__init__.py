"""Tests of milora_vlm/cli/ and the tool wrappers."""
