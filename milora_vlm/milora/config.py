"""MiLoRAConfig: the adapter settings, checked on construction so that bad values fail before any model loads."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from .decompose import INITS, METHODS

RESIDUALS = ("offset", "subtract")
OFFSET_BACKWARDS = ("factors", "residual_copy")


@dataclass
class MiLoRAConfig:
    """Settings of a MiLoRA adapter (PEFT LoRA layers whose A, B start from selected singular triplets of W).

    Each field's meaning is in its `help` (shown by `train_vlm.py --help` as the recipe's `adapter.*` keys).
    """

    r: int = field(default=16, metadata={"help": "LoRA rank. The paper: commonsense 32, math 64, visual 128"})
    lora_alpha: float = field(default=16, metadata={
        "help": "LoRA alpha; the adapter adds (lora_alpha / r) * B @ A. The paper uses alpha = r for MiLoRA "
                "(LoRA on visual instruction tuning: r 128, alpha 256)"})
    target_modules: Union[list[str], str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        metadata={"help": "module names (suffix match, PEFT's rule) or one regex string matched against full names, "
                          "e.g. '.*language_model.*\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)' "
                          "for LLaVA"},
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input, in [0, 1)"})
    init: str = field(default="minor", metadata={
        "help": "which singular triplets of W the adapter's A, B start from (minor is MiLoRA; registered in "
                "milora.decompose.INITS)",
        "choices": INITS})
    residual: str = field(default="offset", metadata={
        "help": "offset: W untouched, the layer computes W x + s (B A - B0 A0) x with B0, A0 frozen (bit-exact at "
                "step 0 in any dtype); subtract: the paper's W_res = W - s B0 A0 written into the base weight",
        "choices": RESIDUALS})
    offset_backward: str = field(default="factors", metadata={
        "help": "residual offset only, how x's gradient is taken. factors: through W and the frozen B0, A0 (no "
                "memory beyond LoRA's; the frozen path's backward GEMMs cost 2 N r (in + out) FLOPs per matrix); "
                "residual_copy: through a copy of W_res = W - s B0 A0 kept for the backward (LoRA's backward "
                "arithmetic, for one more copy of every adapted weight; not under ZeRO-3). Same forward, same "
                "step-0 output either way",
        "choices": OFFSET_BACKWARDS})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={
        "help": "modules trained in full and saved with the adapter (e.g. ['multi_modal_projector'])"})
    seed: int = field(default=0, metadata={
        "help": "seeds the 'random' selection and the 'lora' init, identically on every process"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "where initial factors are cached, keyed by the weights' fingerprint and these settings "
                "('~' is expanded)"})
    method: str = field(default="auto", metadata={
        "help": "decomposition route: svd (fp32 torch.linalg.svd), gram (fp64 Gram + eigh + Rayleigh-Ritz), "
                "gesvda (cuSOLVER's approximate SVD, CUDA only, poor for minor components), auto (gram unless the "
                "matrix is small or the device lacks fp64)",
        "choices": METHODS})
    decompose_device: str = field(default="auto", metadata={
        "help": "auto (the local CUDA device if there is one, else the weight's device) or a device such as "
                "cpu / cuda:0; weights are copied there one at a time for the decomposition"})

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"MiLoRAConfig.r={self.r!r}: give a positive integer rank (the paper uses 32, 64 or 128)")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            raise ValueError(f"MiLoRAConfig.lora_alpha={self.lora_alpha!r}: give a positive number (alpha = r keeps scaling 1)")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(f"MiLoRAConfig.target_modules={self.target_modules!r} is not a valid regex: {exc}") from exc
        elif isinstance(self.target_modules, (list, tuple)) and self.target_modules and all(
            isinstance(t, str) and t for t in self.target_modules
        ):
            self.target_modules = list(self.target_modules)
        else:
            raise ValueError(
                f"MiLoRAConfig.target_modules={self.target_modules!r}: give a non-empty list of module names "
                "(e.g. ['q_proj', 'v_proj']) or one regex string"
            )
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"MiLoRAConfig.lora_dropout={self.lora_dropout!r}: give a probability in [0, 1)")
        if self.init not in INITS:
            raise ValueError(f"MiLoRAConfig.init={self.init!r}: choose one of {INITS.names()} ('minor' is MiLoRA)")
        if self.residual not in RESIDUALS:
            raise ValueError(
                f"MiLoRAConfig.residual={self.residual!r}: choose 'offset' (exact, default) or 'subtract' (the paper's W_res)"
            )
        if self.offset_backward not in OFFSET_BACKWARDS:
            raise ValueError(
                f"MiLoRAConfig.offset_backward={self.offset_backward!r}: choose 'factors' (default) or 'residual_copy' "
                "(faster backward, one more copy of each adapted weight)"
            )
        if self.offset_backward != "factors" and self.residual != "offset":
            raise ValueError(
                f"MiLoRAConfig.offset_backward={self.offset_backward!r} applies to residual 'offset'; residual "
                f"{self.residual!r} already has LoRA's backward: remove offset_backward"
            )
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError(
                    f"MiLoRAConfig.modules_to_save={self.modules_to_save!r}: give a list of module names, "
                    "e.g. ['multi_modal_projector']"
                )
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"MiLoRAConfig.seed={self.seed!r}: give an integer")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not os.fspath(self.cache_dir):
                raise ValueError(f"MiLoRAConfig.cache_dir={self.cache_dir!r}: give a directory path or None")
            self.cache_dir = os.path.expanduser(os.fspath(self.cache_dir))
        if self.method not in METHODS:
            raise ValueError(f"MiLoRAConfig.method={self.method!r}: choose one of {METHODS}")
        if not isinstance(self.decompose_device, str) or not self.decompose_device:
            raise ValueError(f"MiLoRAConfig.decompose_device={self.decompose_device!r}: give 'auto', 'cpu' or 'cuda[:N]'")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MiLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MiLoRAConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
