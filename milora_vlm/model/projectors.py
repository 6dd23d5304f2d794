"""The registered vision-language projectors (`model.projector` in a recipe), all in llava-hf's one layout:
linear_1 -> activation -> linear_2 (LlavaMultiModalProjector), so a projector is its activation plus how a
LLaVA-format projector file maps onto that layout."""

from __future__ import annotations

from dataclasses import dataclass

from milora_vlm.registry import Registry


@dataclass(frozen=True)
class Projector:
    help: str
    hidden_act: str  # LlavaConfig.projector_hidden_act (a transformers ACT2FN name)
    # LLaVA saves this projector as one Linear (mm_projector.weight): it becomes linear_1, with an identity linear_2
    single_linear: bool = False


PROJECTORS: Registry[Projector] = Registry("projector")
PROJECTORS.register("mlp2x_gelu", Projector("LLaVA-1.5's two-layer MLP with a GELU between", "gelu"))
PROJECTORS.register("linear", Projector(
    "LLaVA-1's linear map (llava-hf has no one-layer projector: two linears with no activation between)",
    "linear", single_linear=True))
