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


def test_fingerprint_reads_every_entry():
    """A sampled fingerprint (every 4th entry of a 512 x 512 matrix) missed edits between the samples."""
    w = torch.randn(512, 512)
    for edit in (lambda x: x[:, 1::4].add_(1e-3), lambda x: x[-1, -1].add_(1e-3), lambda x: x[:, 1:].mul_(1.01)):
        w2 = w.clone()
        edit(w2)
        assert weight_fingerprint(w2) != weight_fingerprint(w)
    # the logical (out x in) bytes: a transposed view (Conv1D) and its contiguous copy agree; a large matrix is
    # read in several blocks
    big = torch.randn(3000, 6000, dtype=torch.bfloat16)
    assert weight_fingerprint(big.T) == weight_fingerprint(big.T.contiguous())
    assert weight_fingerprint(big) != weight_fingerprint(big.T.contiguous())


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00not a safetensors file")
    else:  # readable file, right metadata, wrong tensors
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        name = sorted(tensors)[0]
        tensors[name] = tensors[name][:1]
        save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("how", ["truncated", "garbage", "wrong_shapes"])
def test_damaged_entry_is_ignored_and_recomputed(tiny_causal_lm_dir, tmp_path, caplog, count_decompositions, how):
    cfg = MiLoRAConfig(r=4, lora_alpha=8, cache_dir=str(tmp_path))
    first = adapters(apply_milora(fresh(tiny_causal_lm_dir), cfg))
    (entry,) = tmp_path.glob("milora-*.safetensors")
    _damage(entry, how)
    caplog.set_level(logging.INFO, logger="milora_vlm")
    model = apply_milora(fresh(tiny_causal_lm_dir), cfg)
    report = model.milora_init_report
    assert report.cache.startswith(f"miss: {entry} is unreadable") and "recomputing" in report.cache
    assert any(r.levelno == logging.WARNING and entry.name in r.getMessage() for r in caplog.records)
    assert report.decomposed_here == len(first) and len(count_decompositions) == 2 * len(first)
    again = adapters(model)
    assert all(torch.equal(first[k][0], again[k][0]) and torch.equal(first[k][1], again[k][1]) for k in first)
    assert apply_milora(fresh(tiny_causal_lm_dir), cfg).milora_init_report.cache == "hit"  # rewritten


def test_damaged_neighbour_files_are_skipped(tiny_causal_lm_dir, tmp_path, caplog):
    (tmp_path / "milora-garbage.safetensors").write_bytes(b"\xff" * 100)
    (tmp_path / "milora-empty.safetensors").write_bytes(b"")
    from safetensors.torch import save_file  # readable, but its settings are not what this version writes

    save_file({"x": torch.zeros(1)}, str(tmp_path / "milora-odd.safetensors"), metadata={"milora_cache": '{"weights": [1]}'})
    apply_milora(fresh(tiny_causal_lm_dir), MiLoRAConfig(r=4, lora_alpha=8, cache_dir=str(tmp_path)))
    caplog.set_level(logging.INFO, logger="milora_vlm")
    report = apply_milora(fresh(tiny_causal_lm_dir), MiLoRAConfig(r=2, lora_alpha=8, cache_dir=str(tmp_path))).milora_init_report
    assert report.cache.startswith("miss: 1 entries") and "r 4 -> 2" in report.cache
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "milora-garbage.safetensors" in warned and "milora-empty.safetensors" in warned and "milora-odd" in warned


def test_unwritable_cache_is_a_warning(tiny_causal_lm_dir, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    caplog.set_level(logging.INFO, logger="milora_vlm")
    model = apply_milora(fresh(tiny_causal_lm_dir), MiLoRAConfig(r=4, lora_alpha=8, cache_dir=str(blocker / "cache")))
    assert model.milora_init_report.decomposed_here == len(find_targets(model))
    assert any(r.levelno == logging.WARNING and "not cached" in r.getMessage() for r in caplog.records)


def test_cache_dir_tilde_is_expanded(tiny_causal_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = MiLoRAConfig(r=4, lora_alpha=8, cache_dir="~/milora-cache")
    assert cfg.cache_dir == str(tmp_path / "home" / "milora-cache")
    apply_milora(fresh(tiny_causal_lm_dir), cfg)
    assert len(list((tmp_path / "home" / "milora-cache").glob("milora-*.safetensors"))) == 1
    assert not (tmp_path / "~").exists()
