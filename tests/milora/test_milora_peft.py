"""MiLoRA adapters in PEFT's own machinery (issue 13.1-2, 17.1):
- plain PEFT loaders refuse a MiLoRA directory (saved or Trainer checkpoint) with a message naming load_milora and
  the export; init="lora" directories stay plain LoRA and load exactly; the non-DeepSpeed resume path loads A, B;
- get_delta_weight, merge / unmerge and add_weighted_adapter (linear, cat, svd) follow s (B A - B0 A0) in both
  residual forms;
- the fused offset product (_OffsetAdapter) keeps step-0 bit-identity and the paper-form gradients, with x's
  gradient through the factors or through the W_res copy (offset_backward).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel
from transformers import GPT2Config, GPT2LMHeadModel, TrainerControl, TrainerState, TrainingArguments

from milora_vlm.milora import MiLoRACheckpointCallback, MiLoRAConfig, apply_milora, load_milora, save_milora
from milora_vlm.milora.offset import MiLoRALinear, frozen_factors
from milora_vlm.milora.persist import REFUSAL, load_adapter_weights
from milora_vlm.milora.targets import find_targets
from tests.helpers.milora_models import batch, load_model, logits, milora_config, train_step

REFUSED = r"Invalid task type: 'MILORA_ADAPTER.*load_milora.*export_adapter"


def trained(residual: str, model_dir, dropout: float = 0.0, **kw):
    model = apply_milora(load_model("llama", model_dir), milora_config("llama", residual=residual, lora_dropout=dropout, **kw))
    inputs = batch("llama", model)
    train_step("llama", model, inputs, lr=5e-2)
    return model.eval(), inputs


# --- 13.1: no silent wrong load ------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["offset", "subtract"])
def test_plain_peft_refuses_a_milora_directory(tiny_causal_lm_dir, tmp_path, residual):
    model, inputs = trained(residual, tiny_causal_lm_dir)
    save_milora(model, tmp_path / "adapter")
    ckpt = tmp_path / "checkpoint-3"  # the Trainer's own save + the callback, for users of a plain Trainer
    model.save_pretrained(ckpt)
    MiLoRACheckpointCallback(model).on_save(
        TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]), TrainerState(global_step=3), TrainerControl()
    )
    for adapter_dir in (tmp_path / "adapter", ckpt):
        assert json.loads((adapter_dir / "adapter_config.json").read_text())["task_type"] == REFUSAL
        with pytest.raises(ValueError, match=REFUSED):
            PeftModel.from_pretrained(load_model("llama", tiny_causal_lm_dir), str(adapter_dir))
        with pytest.raises(ValueError, match=REFUSED):
            model.load_adapter(str(adapter_dir), adapter_name="other")  # PeftModel.load_adapter
        base = load_model("llama", tiny_causal_lm_dir)
        with pytest.raises(ValueError, match=REFUSED):
            base.load_adapter(str(adapter_dir))  # transformers' PeftAdapterMixin
        assert not any("lora" in n for n, _ in base.named_parameters())  # refused before touching the model
        for loader in (PeftConfig, LoraConfig):
            with pytest.raises(ValueError, match=REFUSED):
                loader.from_pretrained(str(adapter_dir))
        restored = load_milora(load_model("llama", tiny_causal_lm_dir), adapter_dir).eval()
        assert torch.equal(logits(restored, inputs), logits(model, inputs))
        assert restored.peft_config["default"].task_type is None


def test_lora_init_directory_stays_plain_and_exact(tiny_causal_lm_dir, tmp_path):
    model, inputs = trained("offset", tiny_causal_lm_dir, init="lora")
    save_milora(model, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(load_model("llama", tiny_causal_lm_dir), str(tmp_path / "adapter")).eval()
    assert torch.equal(logits(plain, inputs), logits(model, inputs))


def test_resume_without_deepspeed_loads_the_adapter(tiny_causal_lm_dir, tmp_path):
    from milora_vlm.train.trainer import MiLoRATrainer

    model, inputs = trained("offset", tiny_causal_lm_dir, dropout=0.05)
    save_milora(model, tmp_path / "checkpoint-1")
    fresh = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", lora_dropout=0.05))
    MiLoRATrainer._load_from_checkpoint(type("T", (), {"model": fresh})(), str(tmp_path / "checkpoint-1"))
    assert torch.equal(logits(fresh.eval(), inputs), logits(model, inputs))
    with pytest.raises(KeyError, match="no place for"):  # an adapter of other targets is not silently half-loaded
        other = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", target_modules=["q_proj"]))
        load_adapter_weights(other, tmp_path / "checkpoint-1")


# --- 13.2: the delta weight and everything built on it -------------------------------------------------------


def expected_delta(layer, s: float) -> torch.Tensor:
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A0, B0 = frozen_factors(layer, "default")
    delta = s * (B @ A - B0 @ A0)
    return delta.T if layer.fan_in_fan_out else delta


@pytest.mark.parametrize("residual", ["offset", "subtract"])
def test_get_delta_weight_is_the_change_of_w(tiny_causal_lm_dir, residual):
    model, _ = trained(residual, tiny_causal_lm_dir)
    s = model.milora_config.scaling
    for t in find_targets(model):
        assert isinstance(t.layer, MiLoRALinear)
        want = expected_delta(t.layer, s)
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(t.layer.get_delta_weight("default"), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("residual", ["offset", "subtract"])
def test_gpt2_conv1d_delta_weight(residual):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    cfg = MiLoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"], residual=residual, lora_dropout=0.0)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = apply_milora(base, cfg)
    t = find_targets(model)[0]
    with torch.no_grad():
        t.layer.lora_B["default"].weight.add_(0.1)
    torch.testing.assert_close(t.layer.get_delta_weight("default"), expected_delta(t.layer, 2.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("residual", ["offset", "subtract"])
def test_merge_and_unmerge(tiny_causal_lm_dir, residual):
    model, inputs = trained(residual, tiny_causal_lm_dir)
    before = logits(model, inputs)
    weights = {t.name: t.weight.detach().clone() for t in find_targets(model)}
    model.base_model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=1e-5)
    model.base_model.unmerge_adapter()
    for t in find_targets(model):
        torch.testing.assert_close(t.weight, weights[t.name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("residual", ["offset", "subtract"])
@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter(tiny_causal_lm_dir, residual, combination):
    model, inputs = trained(residual, tiny_causal_lm_dir)
    s = model.milora_config.scaling
    r = model.peft_config["default"].r
    for weight, name in ((1.0, "same"), (-0.5, "negated_half")):
        model.add_weighted_adapter(["default"], [weight], name, combination_type=combination, svd_rank=2 * r)
        for t in find_targets(model):
            torch.testing.assert_close(t.layer.get_delta_weight(name), weight * expected_delta(t.layer, s), rtol=1e-4, atol=1e-6)
    assert set(model.peft_config) == {"default", "same", "negated_half"}  # the rank-2r copies are gone
    if residual == "offset":  # the combined adapter, run on the original W, is the trained function
        model.set_adapter("same")
        torch.testing.assert_close(logits(model, inputs), logits_of_default(model, inputs), rtol=0, atol=1e-4)


def logits_of_default(model, inputs):
    model.set_adapter("default")
    return logits(model, inputs)


# --- 17.1: the fused offset product ---------------------------------------------------------------------------


BACKWARDS = ["factors", "residual_copy"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("offset_backward", BACKWARDS)
def test_fused_offset_step0_bit_identical_in_eval_and_without_dropout(tiny_causal_lm_dir, dtype, dropout, offset_backward):
    base = load_model("llama", tiny_causal_lm_dir, dtype)
    inputs = batch("llama", base)
    ref = logits(base, inputs)
    model = apply_milora(base, milora_config("llama", lora_dropout=dropout, offset_backward=offset_backward,
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    assert torch.equal(logits(model.eval(), inputs), ref)
    if dropout == 0.0:  # train mode takes the fused path with autograd: still exact at step 0
        model.train()
        with torch.enable_grad():
            out = model(**inputs).logits
        assert torch.equal(out.detach(), ref)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("alpha", [4, 8])  # scaling 1 (skips the multiplication) and 2
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "frozen-input"])
@pytest.mark.parametrize("offset_backward", BACKWARDS)
def test_fused_offset_gradients_are_the_paper_form(tiny_causal_lm_dir, dropout, alpha, input_grad, offset_backward):
    """Loss, input gradient and adapter gradients equal those of the paper's W_res form (subtract) with the same
    A, B away from A0, B0 and the same dropout masks, for either backward of x. frozen-input: the embeddings need
    no gradient, so the first layer's q/k/v take the backward that skips x's gradient."""
    offset, inputs = trained("offset", tiny_causal_lm_dir, lora_alpha=alpha, offset_backward=offset_backward)
    subtract = apply_milora(load_model("llama", tiny_causal_lm_dir),
                            milora_config("llama", residual="subtract", lora_alpha=alpha))
    with torch.no_grad():
        for t_off, t_sub in zip(find_targets(offset), find_targets(subtract)):
            for part in ("lora_A", "lora_B"):
                getattr(t_sub.layer, part)["default"].weight.copy_(getattr(t_off.layer, part)["default"].weight)
            for m in (t_off.layer, t_sub.layer):
                m.lora_dropout["default"].p = dropout
                m.lora_dropout["default"] = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
    results = []
    for model in (offset, subtract):
        model.train()
        torch.manual_seed(3)
        emb = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(input_grad)
        loss = model(inputs_embeds=emb, labels=inputs["input_ids"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), emb.grad.clone() if input_grad else None, grads))
        model.zero_grad()
    (l_off, gx_off, g_off), (l_sub, gx_sub, g_sub) = results
    torch.testing.assert_close(l_off, l_sub, rtol=0, atol=1e-5)
    if input_grad:
        torch.testing.assert_close(gx_off, gx_sub, rtol=1e-4, atol=1e-6)
    assert g_off.keys() == g_sub.keys() and g_off
    for n in g_off:
        torch.testing.assert_close(g_off[n], g_sub[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("offset_backward", BACKWARDS)
def test_fused_offset_under_autocast(tiny_causal_lm_dir, offset_backward):
    """bf16 autocast over fp32 weights (the Trainer's bf16 without DeepSpeed): forward and backward run, the
    gradients keep the parameters' dtype and are close to the fp32 ones."""
    model, inputs = trained("offset", tiny_causal_lm_dir, offset_backward=offset_backward)
    model.train()
    grads = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
    for n, g in grads[1].items():
        assert g.dtype == torch.float32
        assert torch.linalg.norm(g - grads[0][n]) <= 0.05 * torch.linalg.norm(grads[0][n]) + 1e-6, n


def test_deepcopy_keeps_the_milora_classes(tiny_causal_lm_dir):
    model, inputs = trained("offset", tiny_causal_lm_dir)
    clone = copy.deepcopy(model)
    assert isinstance(find_targets(clone)[0].layer, MiLoRALinear)
    assert torch.equal(logits(clone, inputs), logits(model, inputs))


# --- 17.1: offset_backward 'residual_copy' --------------------------------------------------------------------


def test_residual_copy_is_subtracts_w_res_and_stays_out_of_saved_files(tiny_causal_lm_dir, tmp_path):
    """The copy equals, bit for bit, the W_res residual 'subtract' writes into the weight; W itself is untouched;
    the copy is not saved (the adapter directory is the factors form's), and an inference load does not keep one."""
    copy_model = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", offset_backward="residual_copy"))
    factors_model = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama"))
    subtract = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", residual="subtract"))
    for t_copy, t_fac, t_sub in zip(*(find_targets(m) for m in (copy_model, factors_model, subtract))):
        assert torch.equal(t_copy.layer.milora_frozen["default"].W_res, t_sub.weight)
        assert torch.equal(t_copy.weight, t_fac.weight)
        assert t_fac.layer.milora_frozen["default"].W_res is None
    assert not any("W_res" in k for k in copy_model.state_dict())
    save_milora(copy_model, tmp_path / "adapter")
    inference = load_milora(load_model("llama", tiny_causal_lm_dir), tmp_path / "adapter")
    assert all(t.layer.milora_frozen["default"].W_res is None for t in find_targets(inference))
    resumed = load_milora(load_model("llama", tiny_causal_lm_dir), tmp_path / "adapter", is_trainable=True)
    for t_res, t_sub in zip(find_targets(resumed), find_targets(subtract)):
        assert torch.equal(t_res.layer.milora_frozen["default"].W_res, t_sub.weight)


def test_residual_copy_input_gradient_in_bf16_is_as_accurate_as_the_factors(tiny_causal_lm_dir):
    """In bf16 the copy holds W_res rounded to bf16 (the paper's own backward). Against the exact derivative of the
    same bf16 model's function (its W, A0, B0, A, B in fp64), x's gradient is as close as the factors backward's:
    both are bf16 arithmetic noise (0.55% and 0.59% relative here), not the minor component lost to rounding."""
    def build(dtype, offset_backward):
        base = load_model("llama", tiny_causal_lm_dir, torch.bfloat16).to(dtype)  # fp64: the bf16 W, widened
        return apply_milora(base, milora_config("llama", lora_dropout=0.0, offset_backward=offset_backward))

    trained_model = build(torch.bfloat16, "factors")
    inputs = batch("llama", trained_model)
    train_step("llama", trained_model, inputs, lr=5e-2)

    def input_grad(model):
        with torch.no_grad():  # the trained model's factors and adapter weights, in this model's dtype
            for src, dst in zip(find_targets(trained_model), find_targets(model)):
                for part in ("lora_A", "lora_B"):
                    getattr(dst.layer, part)["default"].weight.copy_(getattr(src.layer, part)["default"].weight)
                for have, want in zip(frozen_factors(dst.layer, "default"), frozen_factors(src.layer, "default")):
                    have.copy_(want)
        model.train()
        emb = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
        model(inputs_embeds=emb, labels=inputs["input_ids"]).loss.backward()
        return emb.grad.double()

    exact = input_grad(build(torch.float64, "factors"))
    error = {b: float((input_grad(build(torch.bfloat16, b)) - exact).norm() / exact.norm()) for b in BACKWARDS}
    assert 0 < error["residual_copy"] <= 1.5 * error["factors"] and error["factors"] < 0.02, error


def test_residual_copy_on_gpt2_conv1d_layout():
    """GPT-2's Conv1D stores W as in x out (fan_in_fan_out): the copy is kept as out x in, and the input gradient
    still equals the factors backward's."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train mode without dropout: same function
    base = GPT2LMHeadModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 10))}
    grads = []
    for offset_backward in BACKWARDS:
        model = apply_milora(copy.deepcopy(base), MiLoRAConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                               lora_dropout=0.0, offset_backward=offset_backward)).train()
        emb = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
        model(inputs_embeds=emb, labels=inputs["input_ids"]).loss.backward()
        grads.append(emb.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_residual_copy_falls_back_when_the_base_layer_trains(tiny_causal_lm_dir):
    """A base weight someone unfroze must get its gradient: the layer then takes x's gradient through the factors
    (the detached-result backward would drop W's gradient), and every gradient equals the factors form's."""
    grads = []
    for offset_backward in BACKWARDS:
        model = apply_milora(load_model("llama", tiny_causal_lm_dir),
                             milora_config("llama", lora_dropout=0.0, offset_backward=offset_backward)).train()
        target = find_targets(model)[0]
        target.weight.requires_grad_(True)
        inputs = batch("llama", model)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert any(n.endswith("base_layer.weight") for n in grads[1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_install_offset_refuses_a_copy_of_the_wrong_shape_or_dtype(tiny_causal_lm_dir):
    """A W_res that is not this layer's out x in, in its weight's dtype, is refused by name (a transposed Conv1D
    copy or an fp32 copy of a bf16 weight would otherwise fail or silently change dtype in the backward)."""
    from milora_vlm.milora.offset import install_offset

    model = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", target_modules=["up_proj"]))
    layer = find_targets(model)[0].layer
    W = layer.get_base_layer().weight.detach()
    with pytest.raises(ValueError, match=r"W_res must be 128 x 64 torch.float32, got \(64, 128\)"):
        install_offset(layer, "default", W_res=W.T.contiguous())
    with pytest.raises(ValueError, match=r"got \(128, 64\) torch.float64"):
        install_offset(layer, "default", W_res=W.double())
    install_offset(layer, "default", W_res=W)


def test_residual_copy_refused_on_zero3_partitioned_weights(tiny_causal_lm_dir, monkeypatch):
    """Under ZeRO-3 each rank holds a shard of W: no whole copy to keep, so the setting is refused before any
    decomposition, naming the fix."""
    import milora_vlm.milora.apply as apply_module

    monkeypatch.setattr(apply_module, "is_partitioned", lambda p: p.dim() == 2 and not p.requires_grad)
    with pytest.raises(ValueError, match="ZeRO-3 partitioned: use offset_backward 'factors'"):
        apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", offset_backward="residual_copy"))
