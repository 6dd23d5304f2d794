"""The registries of swappable parts: exact lookup, clear errors, and that adding an init or a template is one
registration that the recipe, the decomposition and the token stream all pick up."""

from __future__ import annotations

import pytest
import torch

from milora_vlm.data.templates import TEMPLATES, Template, encode_conversation, register_template, render_pieces
from milora_vlm.milora import INITS, MiLoRAConfig, minor_factors, register_init
from milora_vlm.milora.decompose import select_indices
from milora_vlm.model.projectors import PROJECTORS
from milora_vlm.registry import Registry


def test_lookup_is_exact_and_errors_list_the_names():
    reg = Registry("widget")
    reg.register("a", 1)
    reg.register("b", 2)
    assert reg["a"] == 1 and list(reg) == ["a", "b"] and "b" in reg and "A" not in reg and ["a"] not in reg
    with pytest.raises(ValueError, match=r"unknown widget 'A'; registered: a, b"):
        reg["A"]
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register("a", 3)
    assert reg["a"] == 1


def test_the_three_registries_hold_the_builtin_parts():
    assert INITS.names() == ["minor", "principal", "middle", "random", "lora"]
    assert PROJECTORS.names() == ["mlp2x_gelu", "linear"]
    assert set(TEMPLATES) == {"vicuna_v1", "llama3", "chatml", "plain", "alpaca"}
    assert INITS["lora"].select is None and INITS["random"].needs_generator


@pytest.fixture
def scratch_registries(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(INITS, "_entries", dict(INITS._entries))
    monkeypatch.setattr(TEMPLATES, "_entries", dict(TEMPLATES._entries))


def test_a_registered_init_is_usable_from_config_to_factors(scratch_registries):
    @register_init("top_and_bottom", "half the largest and half the smallest triplets")
    def _top_and_bottom(k, r, generator):
        return torch.cat([torch.arange(0, r // 2), torch.arange(k - (r - r // 2), k)])

    assert MiLoRAConfig(init="top_and_bottom").init == "top_and_bottom"
    W = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    A, B = minor_factors(W, 4, init="top_and_bottom")
    U, S, Vh = torch.linalg.svd(W)
    idx = select_indices(10, 4, "top_and_bottom")
    assert idx.tolist() == [0, 1, 8, 9]
    assert torch.allclose(B @ A, (U[:, idx] * S[idx]) @ Vh[idx], atol=1e-5)
    with pytest.raises(ValueError, match="'minor' is MiLoRA"):
        MiLoRAConfig(init="top-and-bottom")


def test_a_registered_template_owns_its_system_prompt_format(scratch_registries, tiny_tokenizer):
    t = register_template(Template("bracketed", system="Be kind.", system_format="[SYS] {system} [/SYS]\n",
                                   prefix="{system}", user="Q: {content}\nA:", assistant=" {content}{eos}"))
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    assert render_pieces(t, conv, "</s>")[0] == ("[SYS] Be kind. [/SYS]\n", False)
    override = [{"from": "system", "value": "Be brief."}, *conv]
    assert render_pieces(t, override, "</s>")[0] == ("[SYS] Be brief. [/SYS]\n", False)
    no_system = [{"from": "system", "value": ""}, *conv]
    assert render_pieces(t, no_system, "</s>")[0] == ("Q: hi\nA:", False)  # no system prompt writes nothing
    enc = encode_conversation(tiny_tokenizer, "bracketed", conv)
    assert tiny_tokenizer.decode([x for x in enc.labels if x != -100]) == " yo</s>"


def test_apply_milora_starts_from_a_registered_init(scratch_registries, tiny_causal_lm_dir):
    """The whole adapter path (targets, distributed init, offset layers) takes a new init with no other change."""
    from transformers import AutoModelForCausalLM

    from milora_vlm.milora import apply_milora
    from milora_vlm.milora.targets import find_targets

    register_init("top_and_bottom", "half the largest and half the smallest triplets")(
        lambda k, r, generator: torch.cat([torch.arange(0, r // 2), torch.arange(k - (r - r // 2), k)]))
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32).eval()
    weights = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith("q_proj.weight")}
    model = apply_milora(base, MiLoRAConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init="top_and_bottom"))
    t = next(t for t in find_targets(model) if t.name.endswith("q_proj"))
    A, B = t.layer.lora_A["default"].weight, t.layer.lora_B["default"].weight
    A_ref, B_ref = minor_factors(weights[t.name + ".weight"], 4, init="top_and_bottom")
    torch.testing.assert_close(B @ A, B_ref @ A_ref, rtol=0, atol=1e-5)
