"""MiLoRA: LoRA adapters initialised from the r minor singular components of each frozen weight.

    from milora_vlm.milora import MiLoRAConfig, apply_milora, save_milora, load_milora
    model = apply_milora(base_model, MiLoRAConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ... train ...
    save_milora(model, "out/adapter")
    model = load_milora(fresh_base_model, "out/adapter")
"""

from .config import RESIDUALS, MiLoRAConfig
from .apply import apply_milora
from .decompose import INITS, minor_factors, register_init
from .distributed import InitReport
from .persist import MiLoRACheckpointCallback, initial_factors, load_milora, save_milora

__all__ = [
    "INITS",
    "RESIDUALS",
    "InitReport",
    "MiLoRACheckpointCallback",
    "MiLoRAConfig",
    "apply_milora",
    "initial_factors",
    "load_milora",
    "minor_factors",
    "register_init",
    "save_milora",
]
