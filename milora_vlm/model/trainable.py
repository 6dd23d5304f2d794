"""What trains, from the recipe's `adapter` and `trainable` sections: adapter targets, freezing, projector.

For LLaVA the adapter's target names (q_proj, ...) become a regex over the *language model's* module paths, so
that the CLIP / SigLIP tower's own q_proj / k_proj / v_proj are never hit; `trainable.projector: milora` adds the
projector's linear_1 / linear_2, `full` puts the projector in PEFT's modules_to_save (trained in full, saved with
the adapter). Checks that need the built model (targets found, rank <= each matrix's smaller side) run here,
before any decomposition.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from torch import nn

from milora_vlm.config import ConfigError, Recipe
from milora_vlm.milora.targets import VISION_TOWER, matches_target

logger = logging.getLogger(__name__)

PROJECTOR = "multi_modal_projector"
LANGUAGE_MODEL = "language_model"


def language_model_regex(names: list[str], include_projector: bool) -> str:
    """A PEFT target_modules regex (full match on module paths) for `names` inside the language model only."""
    alternatives = "|".join(re.escape(n) for n in names)
    pattern = rf"(?:.*\.)?{LANGUAGE_MODEL}\.(?:.*\.)?(?:{alternatives})"
    if include_projector:
        pattern += rf"|(?:.*\.)?{PROJECTOR}\.linear_[12]"
    return pattern


def adapter_target_modules(recipe: Recipe):
    """target_modules for MiLoRAConfig: the recipe's names restricted to the language model (LLaVA) or as given."""
    a = recipe.adapter
    if recipe.model.kind == "llava" and isinstance(a.target_modules, list):
        return language_model_regex(a.target_modules, recipe.trainable.projector == "milora")
    return a.target_modules


def modules_to_save(recipe: Recipe) -> list[str] | None:
    t = recipe.trainable
    out = [m for m, mode in ((PROJECTOR, t.projector), (VISION_TOWER, t.vision_tower)) if mode == "full"]
    return out or None


def check_adapter_targets(model: nn.Module, recipe: Recipe, target_modules) -> list[str]:
    """The names of the Linear modules the adapter will wrap; ConfigError if none, if any lies in the vision tower,
    if the projector is hit while trainable.projector is not 'milora', or if adapter.r exceeds a matrix's min side.
    Works on ZeRO-3 partitioned models (uses in/out_features, not weight shapes)."""
    r = recipe.adapter.r
    found, bad_rank, smallest = [], [], None
    for name, module in model.named_modules():
        if not name or not matches_target(target_modules, name):
            continue
        if VISION_TOWER in name.split("."):
            raise ConfigError(
                f"adapter.target_modules {target_modules!r} matches '{name}' in the vision tower; adapters belong on the "
                "language model (give module names like [q_proj, v_proj], which are restricted to it automatically)"
            )
        if PROJECTOR in name.split(".") and recipe.trainable.projector != "milora":
            raise ConfigError(
                f"adapter.target_modules matches the projector ('{name}'); set trainable.projector: milora for that"
            )
        if not isinstance(module, nn.Linear):
            continue  # PEFT / apply_milora give their own error for non-Linear targets
        found.append(name)
        side = min(module.in_features, module.out_features)
        smallest = side if smallest is None else min(smallest, side)
        if r > side:
            bad_rank.append(f"{name} ({module.out_features}x{module.in_features})")
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"adapter.target_modules {recipe.adapter.target_modules!r} matches no Linear module of the "
            f"{'language model' if recipe.model.kind == 'llava' else 'model'}; Linear module names here: {linear}"
        )
    if bad_rank:
        raise ConfigError(
            f"adapter.r {r} is larger than the smaller side of {len(bad_rank)} target matrices, e.g. "
            f"{bad_rank[0]}; use adapter.r <= {smallest} "
            "or drop those modules from adapter.target_modules"
        )
    return found


def _set_trainable(model: nn.Module, prefix_part: str, trainable: bool) -> int:
    n = 0
    for name, p in model.named_parameters():
        if prefix_part in name.split("."):
            p.requires_grad_(trainable)
            n += p.numel()
    return n


def apply_trainable(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Freeze the model, then add the MiLoRA adapter (returns a PeftModel) or unfreeze the declared full modules."""
    from milora_vlm.milora import apply_milora

    model.requires_grad_(False)
    t = recipe.trainable
    if recipe.adapter is not None:
        targets = adapter_target_modules(recipe)
        names = check_adapter_targets(model, recipe, targets)
        logger.info("adapter on %d matrices (e.g. %s)", len(names), names[0])
        config = dataclasses.replace(recipe.adapter, target_modules=targets, modules_to_save=modules_to_save(recipe))
        model = apply_milora(model, config)
    else:
        if recipe.model.kind == "llava":
            for part, mode in ((PROJECTOR, t.projector), (VISION_TOWER, t.vision_tower), (LANGUAGE_MODEL, t.language_model)):
                if mode == "full":
                    _set_trainable(model, part, True)
            if t.language_model == "full":
                model.lm_head.requires_grad_(True)
        elif t.language_model == "full":
            model.requires_grad_(True)
    if count_parameters(model)[0] == 0:
        raise ConfigError("nothing to train: no parameter requires grad after applying the recipe's trainable section")
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), using ZeRO-3's full sizes (ds_numel) where parameters are partitioned."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
