"""apply_milora / save_milora / load_milora on tiny Llama, LLaVA and GPT-2 (Conv1D) models."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from milora_vlm.milora import MiLoRACheckpointCallback, MiLoRAConfig, apply_milora, load_milora, save_milora
from milora_vlm.milora.offset import MiLoRAOffsetVariant, frozen_factors, has_offset
from milora_vlm.milora.targets import find_targets
from tests.helpers.milora_models import batch, load_model, logits, milora_config, train_step


@pytest.fixture
def model_dir(request, tiny_causal_lm_dir, tiny_llava_dir):
    return {"llama": tiny_causal_lm_dir, "llava": tiny_llava_dir}[request.param]


# --- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"r": 0}, "positive integer rank"),
        ({"r": 2.5}, "positive integer rank"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"target_modules": []}, "non-empty list"),
        ({"target_modules": "(unclosed"}, "not a valid regex"),
        ({"lora_dropout": 1.0}, r"\[0, 1\)"),
        ({"init": "major"}, "'minor' is MiLoRA"),
        ({"residual": "merge"}, "offset"),
        ({"modules_to_save": "multi_modal_projector"}, "list of module names"),
        ({"seed": "0"}, "integer"),
        ({"method": "qr"}, "method"),
        ({"offset_backward": "copy"}, "'factors' .*'residual_copy'"),
        ({"residual": "subtract", "offset_backward": "residual_copy"}, "applies to residual 'offset'.*remove offset_backward"),
    ],
)
def test_config_rejects_bad_values(fields, match):
    with pytest.raises(ValueError, match=match):
        MiLoRAConfig(**fields)


def test_config_round_trips_through_dict():
    cfg = MiLoRAConfig(r=8, target_modules="x", init="principal")
    assert MiLoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MiLoRAConfig fields"):
        MiLoRAConfig.from_dict({"rank": 8})


# --- step-0 function ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_dir", ["llama", "llava"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_offset_logits_bit_identical(model_dir, dtype):
    kind = "llava" if "llava" in str(model_dir) else "llama"
    base = load_model(kind, model_dir, dtype)
    inputs = batch(kind, base)
    ref = logits(base, inputs)
    model = apply_milora(base, milora_config(kind)).eval()
    assert all(has_offset(t.layer, "default") for t in find_targets(model))
    t = find_targets(model)[0]
    assert float(t.layer.lora_B["default"].weight.detach().abs().max()) > 0  # really initialised from W, not zero
    assert torch.equal(logits(model, inputs), ref)


@pytest.mark.parametrize("init", ["principal", "middle", "random"])
def test_other_inits_also_bit_identical(tiny_causal_lm_dir, init):
    base = load_model("llama", tiny_causal_lm_dir)
    inputs = batch("llama", base)
    ref = logits(base, inputs)
    model = apply_milora(base, milora_config("llama", init=init)).eval()
    assert torch.equal(logits(model, inputs), ref)


@pytest.mark.parametrize("model_dir", ["llama", "llava"], indirect=True)
def test_subtract_logits_within_1e5_fp32(model_dir):
    kind = "llava" if "llava" in str(model_dir) else "llama"
    base = load_model(kind, model_dir)
    inputs = batch(kind, base)
    ref = logits(base, inputs)
    w_before = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith("q_proj.weight")}
    model = apply_milora(base, milora_config(kind, residual="subtract")).eval()
    assert not any(has_offset(t.layer, "default") for t in find_targets(model))
    # W_res = W - s B0 A0 really is in the base weights
    t = next(t for t in find_targets(model) if t.name.endswith("q_proj"))
    s = model.milora_config.scaling
    B0, A0 = t.layer.lora_B["default"].weight, t.layer.lora_A["default"].weight
    torch.testing.assert_close(t.weight + s * B0 @ A0, w_before[t.name + ".weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, inputs), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_dir", ["llama", "llava"], indirect=True)
def test_subtract_bf16_error_is_reported(model_dir, capsys):
    """The paper's W_res rounded to bf16 moves the step-0 logits (offset does not): measured, printed, bounded."""
    kind = "llava" if "llava" in str(model_dir) else "llama"
    base = load_model(kind, model_dir, torch.bfloat16)
    inputs = batch(kind, base)
    ref = logits(base, inputs).float()
    out = logits(apply_milora(base, milora_config(kind, residual="subtract")).eval(), inputs).float()
    rel = float((out - ref).norm() / ref.norm())
    with capsys.disabled():
        print(f"\n[{kind}] bf16 subtract: max |d logits| {float((out - ref).abs().max()):.3g}, relative {rel:.3g}")
    assert 0 < rel < 0.05


def test_lora_init_is_peft_default_and_seeded(tiny_causal_lm_dir):
    base = load_model("llama", tiny_causal_lm_dir)
    inputs = batch("llama", base)
    ref = logits(base, inputs)
    model = apply_milora(base, milora_config("llama", init="lora")).eval()
    targets = find_targets(model)
    assert all(float(t.layer.lora_B["default"].weight.detach().abs().max()) == 0 for t in targets)
    assert not any(has_offset(t.layer, "default") for t in targets)
    assert model.milora_init_report.decomposed_here == 0
    assert torch.equal(logits(model, inputs), ref)
    again = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", init="lora"))
    assert torch.equal(find_targets(again)[0].layer.lora_A["default"].weight, targets[0].layer.lora_A["default"].weight)


# --- training -----------------------------------------------------------------------------------------------


def test_only_adapter_and_projector_train_and_one_step_moves_them(tiny_llava_dir):
    model = apply_milora(load_model("llava", tiny_llava_dir), milora_config("llava", lora_dropout=0.0))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or "modules_to_save" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {t.name: [b.clone() for b in frozen_factors(t.layer, "default")] for t in find_targets(model)}

    train_step("llava", model, batch("llava", model))

    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, trainable[n]), f"{n} did not move"
        else:
            assert torch.equal(p, frozen[n]), f"frozen {n} moved"
    for t in find_targets(model):
        A0, B0 = frozen_factors(t.layer, "default")
        assert torch.equal(A0, buffers[t.name][0]) and torch.equal(B0, buffers[t.name][1])
        assert not A0.requires_grad and not B0.requires_grad


def test_offset_equals_subtract_function_after_training(tiny_causal_lm_dir):
    """The offset form and the paper's W_res form are the same function (fp32) once A, B have moved."""
    offset = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", lora_dropout=0.0))
    subtract = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", residual="subtract"))
    inputs = batch("llama", offset)
    train_step("llama", offset, inputs)
    with torch.no_grad():
        for t_off, t_sub in zip(find_targets(offset), find_targets(subtract)):
            for part in ("lora_A", "lora_B"):
                getattr(t_sub.layer, part)["default"].weight.copy_(getattr(t_off.layer, part)["default"].weight)
    torch.testing.assert_close(logits(offset, inputs), logits(subtract.eval(), inputs), rtol=0, atol=1e-5)


def test_merge_in_place_matches_unmerged(tiny_causal_lm_dir):
    model = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", lora_dropout=0.0))
    inputs = batch("llama", model)
    train_step("llama", model, inputs)
    before = logits(model, inputs)
    model.base_model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=1e-5)
    assert isinstance(find_targets(model)[0].layer.lora_variant["default"], MiLoRAOffsetVariant)


# --- GPT-2 Conv1D and refusals ------------------------------------------------------------------------------


@pytest.fixture
def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()


@pytest.mark.parametrize("residual", ["offset", "subtract"])
def test_gpt2_conv1d_supported(tiny_gpt2, residual):
    inputs = {"input_ids": torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))}
    ref = logits(tiny_gpt2, inputs)
    cfg = MiLoRAConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], residual=residual, lora_dropout=0.0)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT switches Conv1D layers to fan_in_fan_out
        model = apply_milora(tiny_gpt2, cfg).eval()
    out = logits(model, inputs)
    if residual == "offset":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_unsupported_target_is_refused(tiny_causal_lm_dir):
    with pytest.raises(TypeError, match="'model.embed_tokens' is a Embedding"):
        apply_milora(load_model("llama", tiny_causal_lm_dir), MiLoRAConfig(r=4, target_modules=["embed_tokens"]))


def test_rank_above_matrix_size_is_refused(tiny_causal_lm_dir):
    with pytest.raises(ValueError, match=r"target 'model.layers.0.self_attn.q_proj' \(64 x 64\): r=100 must satisfy"):
        apply_milora(load_model("llama", tiny_causal_lm_dir), MiLoRAConfig(r=100, target_modules=["q_proj"]))


def test_nan_weight_is_refused(tiny_causal_lm_dir):
    base = load_model("llama", tiny_causal_lm_dir)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"target 'model.layers.0.self_attn.q_proj': weight contains NaN or inf"):
        apply_milora(base, MiLoRAConfig(r=4, target_modules=["q_proj"]))


def test_apply_rejects_wrong_arguments(tiny_causal_lm_dir):
    base = load_model("llama", tiny_causal_lm_dir)
    with pytest.raises(TypeError, match="MiLoRAConfig"):
        apply_milora(base, {"r": 4})
    model = apply_milora(base, milora_config("llama", init="lora"))
    with pytest.raises(TypeError, match="not a PeftModel"):
        apply_milora(model, milora_config("llama"))


# --- save / load --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_dir", ["llama", "llava"], indirect=True)
@pytest.mark.parametrize("residual", ["offset", "subtract"])
def test_save_load_restores_trained_function(model_dir, residual, tmp_path):
    kind = "llava" if "llava" in str(model_dir) else "llama"
    model = apply_milora(load_model(kind, model_dir), milora_config(kind, residual=residual, lora_dropout=0.0))
    inputs = batch(kind, model)
    train_step(kind, model, inputs)
    trained = logits(model, inputs)
    save_milora(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "milora_config.json").read_text())
    assert meta["milora"]["residual"] == residual and len(meta["targets"]) == len(find_targets(model))

    restored = load_milora(load_model(kind, model_dir), tmp_path / "adapter").eval()
    assert torch.equal(logits(restored, inputs), trained)
    assert not any(p.requires_grad for p in restored.parameters())

    trainable = load_milora(load_model(kind, model_dir), tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    save_milora(trainable, tmp_path / "again")  # a loaded adapter saves again (resume, export)
    assert (tmp_path / "again" / "milora_init.safetensors").exists()


def test_load_errors(tiny_causal_lm_dir, tmp_path):
    model = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "plain")  # PEFT files only
    with pytest.raises(FileNotFoundError, match="milora_config.json not found"):
        load_milora(load_model("llama", tiny_causal_lm_dir), tmp_path / "plain")
    save_milora(model, tmp_path / "full")
    (tmp_path / "full" / "milora_init.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="B0/A0 are missing"):
        load_milora(load_model("llama", tiny_causal_lm_dir), tmp_path / "full")
    with pytest.raises(TypeError, match="carries no MiLoRA adapter"):
        save_milora(load_model("llama", tiny_causal_lm_dir), tmp_path / "x")


def test_checkpoint_callback_completes_trainer_checkpoints(tiny_causal_lm_dir, tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama"))
    ckpt = tmp_path / "checkpoint-7"
    model.save_pretrained(ckpt)  # what the Trainer writes
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    state = TrainerState(global_step=7)
    MiLoRACheckpointCallback(model).on_save(args, state, TrainerControl())
    inputs = batch("llama", model)
    restored = load_milora(load_model("llama", tiny_causal_lm_dir), ckpt).eval()
    assert torch.equal(logits(restored, inputs), logits(model.eval(), inputs))


# --- init edge cases ----------------------------------------------------------------------------------------


def model_state(model) -> dict:
    """Everything apply_milora could leave behind: module tree and types, attributes, flags, values, config."""
    return {
        "modules": [(n, type(m).__name__, sorted(vars(m))) for n, m in model.named_modules()],
        "params": {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)},
        "config": model.config.to_dict(),
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["modules"] == b["modules"] and a["config"] == b["config"]
    assert a["params"].keys() == b["params"].keys()
    for n, (grad, value) in a["params"].items():
        assert b["params"][n][0] == grad and torch.equal(b["params"][n][1], value), n


def _fail_third_decomposition(monkeypatch):
    import milora_vlm.milora.distributed as dist_mod

    real, calls = dist_mod.decompose, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")
        return real(*args, **kwargs)

    monkeypatch.setattr(dist_mod, "decompose", flaky)


@pytest.mark.parametrize(
    "cause, fields, error, match",
    [
        ("peft", {"target_modules": ["no_such_module"]}, ValueError, "no_such_module"),
        ("preflight", {"r": 100, "target_modules": ["q_proj"]}, ValueError, "r=100"),
        ("decompose", {}, torch.linalg.LinAlgError, r"target '.*': simulated"),
        ("decompose_subtract", {"residual": "subtract", "modules_to_save": ["lm_head"]}, torch.linalg.LinAlgError, "simulated"),
    ],
)
def test_failed_apply_leaves_the_model_untouched(tiny_causal_lm_dir, monkeypatch, cause, fields, error, match):
    model = load_model("llama", tiny_causal_lm_dir)
    before = model_state(model)
    if cause.startswith("decompose"):
        _fail_third_decomposition(monkeypatch)
    with pytest.raises(error, match=match):
        apply_milora(model, milora_config("llama", **fields))
    assert_same_state(before, model_state(model))
    assert not hasattr(model, "peft_config")
    monkeypatch.undo()
    # the same model takes the adapter afterwards, exactly as a fresh one does
    inputs = batch("llama", model)
    retried = apply_milora(model, milora_config("llama"))
    fresh = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama"))
    assert [t.name for t in find_targets(retried)] == [t.name for t in find_targets(fresh)]
    assert torch.equal(logits(retried.eval(), inputs), logits(fresh.eval(), inputs))


@pytest.fixture
def tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_subtract_on_tied_weight_is_refused(tied_llama):
    before = model_state(tied_llama)
    cfg = MiLoRAConfig(r=4, lora_alpha=4, target_modules=r".*lm_head", residual="subtract")
    with pytest.raises(ValueError, match=r"target 'lm_head' shares its weight with 'model.embed_tokens.weight'.*offset"):
        apply_milora(tied_llama, cfg)
    assert_same_state(before, model_state(tied_llama))
    # offset leaves W (and so the embeddings) untouched: allowed
    embeddings = tied_llama.model.embed_tokens.weight.detach().clone()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
    ref = logits(tied_llama, inputs)
    model = apply_milora(tied_llama, MiLoRAConfig(r=4, lora_alpha=4, target_modules=r".*lm_head")).eval()
    assert torch.equal(logits(model, inputs), ref)
    assert torch.equal(model.base_model.model.model.embed_tokens.weight, embeddings)


def test_disable_adapter_refused_under_subtract_exact_under_offset(tiny_causal_lm_dir):
    base = load_model("llama", tiny_causal_lm_dir)
    inputs = batch("llama", base)
    ref = logits(base, inputs)
    subtract = apply_milora(base, milora_config("llama", residual="subtract", lora_dropout=0.0))
    for call in (subtract.disable_adapter, subtract.base_model.unload, subtract.base_model.disable_adapter_layers):
        with pytest.raises(RuntimeError, match="W_res = W - s B0 A0, not the base model"):
            call()
    merged = subtract.merge_and_unload()  # W_res + s B A: still the adapted model, allowed
    torch.testing.assert_close(logits(merged, inputs), ref, rtol=0, atol=1e-5)

    offset = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", lora_dropout=0.0))
    train_step("llama", offset, inputs)
    with offset.disable_adapter():
        assert torch.equal(logits(offset, inputs), ref)


def test_subtract_keeps_fp64_precision(tiny_causal_lm_dir):
    base = load_model("llama", tiny_causal_lm_dir, torch.float64)
    inputs = batch("llama", base)
    ref = logits(base, inputs)
    w_before = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith("proj.weight")}
    model = apply_milora(base, milora_config("llama", residual="subtract")).eval()
    s = model.milora_config.scaling
    for t in find_targets(model):
        B0, A0 = t.layer.lora_B["default"].weight, t.layer.lora_A["default"].weight
        assert t.weight.dtype == B0.dtype == torch.float64
        # rounding W_res through fp32 errs by ~1e-9 here; fp64 arithmetic by ~1e-17
        torch.testing.assert_close(t.weight + s * (B0 @ A0), w_before[t.name + ".weight"], rtol=0, atol=1e-15)
    torch.testing.assert_close(logits(model, inputs), ref, rtol=0, atol=1e-12)


def test_merge_unmerge_keep_fp64_precision(tiny_causal_lm_dir):
    model = apply_milora(load_model("llama", tiny_causal_lm_dir, torch.float64), milora_config("llama", lora_dropout=0.0))
    inputs = batch("llama", model)
    train_step("llama", model, inputs)
    t = find_targets(model)[0]
    w0 = t.weight.detach().clone()
    unmerged = logits(model, inputs)
    model.base_model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), unmerged, rtol=0, atol=1e-12)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(t.weight, w0, rtol=0, atol=1e-15)


def test_llava_name_targets_stay_out_of_the_vision_tower(tiny_llava_dir, caplog):
    caplog.set_level(logging.INFO, logger="milora_vlm")
    base = load_model("llava", tiny_llava_dir)
    inputs = batch("llava", base)
    ref = logits(base, inputs)
    model = apply_milora(base, MiLoRAConfig(r=4, lora_alpha=8)).eval()  # default target_modules: names
    names = [t.name for t in find_targets(model)]
    assert names and all("language_model" in n for n in names), names
    assert "vision tower" in caplog.text
    assert torch.equal(logits(model, inputs), ref)
    # a regex is taken as written: the way to adapt the tower on purpose
    tower = apply_milora(load_model("llava", tiny_llava_dir), MiLoRAConfig(r=4, target_modules=r".*vision_tower.*\.q_proj"))
    assert find_targets(tower) and all("vision_tower" in t.name for t in find_targets(tower))


def test_nearly_dead_adapter_is_reported_per_matrix(tiny_causal_lm_dir, caplog):
    base = load_model("llama", tiny_causal_lm_dir)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[:, :8] = 0  # rank 56: the 4 minor singular values are zero
    caplog.set_level(logging.INFO, logger="milora_vlm")
    report = apply_milora(base, milora_config("llama")).milora_init_report
    name = "model.layers.0.self_attn.q_proj"
    assert len(report.warnings) == 1 and report.warnings[0].startswith(f"target '{name}': adapter starts nearly dead")
    figures = report.matrices[name]
    assert figures["selected_min"] < 1e-6 * figures["sigma_max"] and figures["a0_vs_lora"] < 1e-3
    assert f"{figures['selected_min']:.2e}" in report.warnings[0]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(name in m and "nearly dead" in m for m in logged)
    healthy = report.matrices["model.layers.0.self_attn.k_proj"]
    assert healthy["a0_vs_lora"] > 1e-2 and healthy["selected_min"] > 1e-4 * healthy["sigma_max"]
