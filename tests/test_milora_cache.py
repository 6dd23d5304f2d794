"""The factor cache: same weights and settings -> cache hit without decomposition; anything else -> recompute,
with the reason logged."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from milora_vlm.milora import MiLoRAConfig, apply_milora
from milora_vlm.milora import decompose as decompose_mod
from milora_vlm.milora.cache import weight_fingerprint
from milora_vlm.milora.targets import find_targets


def fresh(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def adapters(model) -> dict:
    return {t.name: (t.layer.lora_A["default"].weight.detach().clone(), t.layer.lora_B["default"].weight.detach().clone()) for t in find_targets(model)}


@pytest.fixture
def count_decompositions(monkeypatch):
    """Count calls of the one decomposition function as the init pipeline sees it."""
    import milora_vlm.milora.distributed as dist_mod

    calls = []
    real = decompose_mod.decompose

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(dist_mod, "decompose", counting)
    return calls


def test_cache_hit_skips_decomposition(tiny_causal_lm_dir, tmp_path, caplog, count_decompositions):
    cfg = MiLoRAConfig(r=4, lora_alpha=8, cache_dir=str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="milora_vlm")
    first = apply_milora(fresh(tiny_causal_lm_dir), cfg)
    n = len(find_targets(first))
    assert first.milora_init_report.cache == f"miss: no cached factors in {cfg.cache_dir}"
    assert len(count_decompositions) == n
    assert len(list((tmp_path / "cache").glob("milora-*.safetensors"))) == 1

    caplog.clear()
    second = apply_milora(fresh(tiny_causal_lm_dir), cfg)
    assert second.milora_init_report.cache == "hit" and second.milora_init_report.decomposed_here == 0
    assert len(count_decompositions) == n  # no new call
    assert "cache hit" in caplog.text
    a, b = adapters(first), adapters(second)
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)

    # residual mode does not change the factors: subtract reuses the entry
    third = apply_milora(fresh(tiny_causal_lm_dir), MiLoRAConfig(r=4, lora_alpha=8, cache_dir=cfg.cache_dir, residual="subtract"))
    assert third.milora_init_report.cache == "hit"


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"r": 2}, "r 4 -> 2"),
        ({"lora_alpha": 4}, "lora_alpha 8 -> 4"),
        ({"init": "principal"}, "init 'minor' -> 'principal'"),
        ({"seed": 1}, "seed 0 -> 1"),
        ({"method": "svd"}, "method 'auto' -> 'svd'"),
        ({"target_modules": ["q_proj"]}, "targets differ"),
    ],
)
def test_changed_settings_recompute_and_say_why(tiny_causal_lm_dir, tmp_path, caplog, change, reason):
    base = {"r": 4, "lora_alpha": 8, "cache_dir": str(tmp_path)}
    apply_milora(fresh(tiny_causal_lm_dir), MiLoRAConfig(**base))
    caplog.set_level(logging.INFO, logger="milora_vlm")
    model = apply_milora(fresh(tiny_causal_lm_dir), MiLoRAConfig(**{**base, **change}))
    report = model.milora_init_report
    assert report.cache.startswith("miss") and reason in report.cache
    assert report.decomposed_here == len(find_targets(model))
    assert "cache miss" in caplog.text and reason in caplog.text


def test_changed_weights_recompute(tiny_causal_lm_dir, tmp_path):
    cfg = MiLoRAConfig(r=4, lora_alpha=8, cache_dir=str(tmp_path))
    apply_milora(fresh(tiny_causal_lm_dir), cfg)
    finetuned = fresh(tiny_causal_lm_dir)
    with torch.no_grad():
        finetuned.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    report = apply_milora(finetuned, cfg).milora_init_report
    assert "weights differ in 1 of 10 targets (e.g. model.layers.1.mlp.down_proj)" in report.cache


def test_fingerprint_sees_dtype_shape_and_values():
    w = torch.randn(300, 200)
    assert weight_fingerprint(w) == weight_fingerprint(w.clone())
    assert weight_fingerprint(w) != weight_fingerprint(w.to(torch.bfloat16))
    assert weight_fingerprint(w) != weight_fingerprint(w.reshape(200, 300))
    w2 = w.clone()
    w2 += 1e-3
    assert weight_fingerprint(w) != weight_fingerprint(w2)
