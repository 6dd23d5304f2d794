"""The test suite; its folders mirror milora_vlm/ (README, Tests). Shared code lives in tests/helpers/."""
