"""Export round trips: merged checkpoint and plain rank-2r LoRA give the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlavaProcessor

from milora_vlm.export import export_lora
from milora_vlm.milora import apply_milora, save_milora
from tests.helpers import load_script
from tests.helpers.milora_models import batch, load_model, logits, milora_config, train_step


export_cli = load_script("scripts/export_adapter.py", "export_adapter_cli").main  # main() called in-process


@pytest.fixture(params=[("llava", "offset"), ("llava", "subtract"), ("llama", "offset")], ids=lambda p: "-".join(p))
def trained(request, tiny_llava_dir, tiny_causal_lm_dir, tmp_path):
    """A MiLoRA adapter moved by one optimizer step (LLaVA: projector in modules_to_save), saved."""
    kind, residual = request.param
    base_dir = tiny_llava_dir if kind == "llava" else tiny_causal_lm_dir
    model = apply_milora(load_model(kind, base_dir), milora_config(kind, residual=residual, lora_dropout=0.0))
    inputs = batch(kind, model)
    train_step(kind, model, inputs, lr=5e-2)
    save_milora(model, tmp_path / "adapter")
    return kind, base_dir, tmp_path / "adapter", inputs, logits(model, inputs)


def test_merged_export_matches_trained(trained, tmp_path):
    kind, base_dir, adapter, inputs, expected = trained
    out = tmp_path / "merged"
    export_cli(["--adapter", str(adapter), "--base", str(base_dir), "--to", "merged", "--output", str(out)])
    merged = load_model(kind, out)  # plain from_pretrained of the model's own class
    assert type(merged) is type(load_model(kind, base_dir))
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(load_model(kind, base_dir), inputs), expected, atol=1e-3)  # training moved it
    if kind == "llava":
        assert isinstance(LlavaProcessor.from_pretrained(out), LlavaProcessor)
    else:
        assert AutoTokenizer.from_pretrained(out).vocab_size > 0


def test_lora_export_loads_in_vanilla_peft_on_original_base(trained, tmp_path):
    kind, base_dir, adapter, inputs, expected = trained
    out = tmp_path / "lora"
    export_cli(["--adapter", str(adapter), "--to", "lora", "--output", str(out)])
    cfg = json.loads((out / "adapter_config.json").read_text())
    src = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * src["r"] and cfg["lora_alpha"] == 2 * src["lora_alpha"]
    if kind == "llava":  # the trained projector travels with the adapter
        assert any("multi_modal_projector" in k for k in load_file(str(out / "adapter_model.safetensors")))
    vanilla = PeftModel.from_pretrained(load_model(kind, base_dir), str(out)).eval()
    torch.testing.assert_close(logits(vanilla, inputs), expected, rtol=0, atol=1e-5)


def test_export_errors(tiny_causal_lm_dir, tmp_path):
    with pytest.raises(SystemExit):  # argparse: merged needs --base
        export_cli(["--adapter", str(tmp_path), "--to", "merged", "--output", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="not a MiLoRA adapter directory"):
        export_lora(tmp_path, tmp_path / "o")
