"""The demo base model's settings and its finished-output check, without torch: scripts/build_demo_base.py reads
them to build its options and to reuse a finished base model in a second or so, importing the builder
(milora_vlm.demo.base_model: torch, transformers; tens of seconds on a loaded 2-core box) only to build one."""

from __future__ import annotations

import os
from dataclasses import dataclass

INFO_FILE = "demo_base.json"


@dataclass
class BaseModelSpec:
    """Sizes and schedule of the demo's base model. The defaults are what scripts/demo.sh builds."""

    image_size: int = 64  # easy-VQA's own size; at 32 px the smallest shapes become a few pixels
    patch_size: int = 8  # 64 image tokens; patch 16 (16 tokens) cannot tell small shapes apart
    vision_hidden: int = 128
    vision_layers: int = 3
    text_hidden: int = 128
    # 3 + 3 layers (were 4 + 4): the demo's targets met on MiLoRA seeds 0-2 in ~255 s from scratch instead of ~360
    # (BENCHMARKS.md, "easy-VQA demo", with what other base-model seeds do)
    text_layers: int = 3
    vocab_size: int = 512
    # Without a prefix space an answer's first word ("circle") is a different token from the same word inside a
    # caption (" circle"): the new task's answers would be tokens the frozen output layer never produced, and
    # LoRA/MiLoRA stall at a near-uniform answer (README, "The main job").
    tokenizer_prefix_space: bool = True
    template: str = "chatml"  # short prompts (one token per marker): cheap on a CPU
    batch_size: int = 64
    vision_epochs: int = 10
    vision_lr: float = 1e-3
    # One epoch each of stages 2 and 3 meets the demo's targets on seeds 0-2 at half the steps of two; the tower
    # needs its 10 epochs for shape accuracy (BENCHMARKS.md, "easy-VQA demo").
    align_epochs: int = 1
    knowledge_epochs: int = 1
    lm_lr: float = 2e-3
    # Keep the captions in stage 3's mix (as LLaVA's stage-2 mix keeps image descriptions): without them stage 3
    # (colour questions only, projector trained) lets the shape information go, and adapters on the language model
    # cannot learn shape questions at all (README, "The main job").
    knowledge_with_captions: bool = True
    # Ask stage 3's captions as a chat question (LLaVA's instruction mix has "describe the image" conversations) so
    # the base model answers two kinds of question and must read the question to know which answer it owes; None:
    # the captions stay in stage 2's plain format (CLI: --caption-prompt ""). With plain captions MiLoRA answered a
    # shape to every question and lost the old task (README, "The base must read the question").
    caption_prompt: str | None = "describe the image."
    train_family: str = "old"
    max_images: int | None = None  # cut-down sizes for tests
    max_questions: int | None = None
    check_questions: int = 500  # test questions of the family scored (teacher-forced) at the end
    seed: int = 0


def is_built(path: str) -> bool:
    """A finished base model: weights, processor and the info file (written last)."""
    return os.path.isfile(os.path.join(path, INFO_FILE)) and os.path.isfile(os.path.join(path, "config.json"))
