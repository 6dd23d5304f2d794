"""milora-vlm: MiLoRA finetuning for LLaVA-style vision-language models and causal LMs."""

__version__ = "0.1.0"
