#!/usr/bin/env python
"""Finetune a LLaVA-style model or a causal LM with MiLoRA (or LoRA / PiSSA / full) under DeepSpeed.

    deepspeed [--num_gpus N | --hostfile H] scripts/train_vlm.py --config configs/<recipe>.yaml [--key value ...]

Overrides use the recipe's own keys (--adapter.r 64, --data.train_file x.jsonl, --trainable.projector full) or
TrainingArguments names (--output_dir, --max_steps, --save_steps, --seed, --learning_rate,
--resume_from_checkpoint DIR|auto). Without the launcher (`python scripts/train_vlm.py ...`) it runs as one process.
"""

import sys

from milora_vlm.train.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
