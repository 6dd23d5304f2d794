"""Export round trips: merged checkpoint and plain rank-2r LoRA give the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlavaProcessor

from milora_vlm.cli.export_adapter import main as export_adapter_main
from milora_vlm.export import export_adapter, export_lora
from milora_vlm.milora import apply_milora, save_milora
from milora_vlm.milora.persist import INIT_FILE, AdapterFileError
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


# ---------------------------------------------------------------------------------------------------------------
# damaged or mismatched adapter files, and where an export may be written


@pytest.fixture
def adapter(tiny_causal_lm_dir, tmp_path):
    """A freshly initialised (untrained) r=4 MiLoRA adapter on the tiny Llama: enough for the error paths."""
    model = apply_milora(load_model("llama", tiny_causal_lm_dir), milora_config("llama", lora_dropout=0.0))
    save_milora(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_json(path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("to", ["lora", "merged"])
@pytest.mark.parametrize("rank", [3, 2], ids=["r-1", "r/2"])
def test_init_factors_of_another_rank_are_refused(adapter, tmp_path, to, rank):
    """A0/B0 that do not fit lora_A/lora_B would export a silently different function (or fail in a GEMM)."""
    init = adapter / INIT_FILE
    factors = load_file(str(init))
    save_file({k: (v[:rank] if k.endswith(".A0") else v[:, :rank]).contiguous() for k, v in factors.items()}, str(init))
    out = tmp_path / "out"
    with pytest.raises(AdapterFileError, match="do not match"):
        export_adapter(adapter, None, to, out)
    assert not out.exists() or not any(out.iterdir())  # nothing that looks like a finished export


def test_adapter_config_r_not_an_integer(adapter, tmp_path):
    edit_json(adapter / "adapter_config.json", lambda d: d.update(r="4"))
    with pytest.raises(AdapterFileError, match="r = '4' is not a positive integer"):
        export_adapter(adapter, None, "lora", tmp_path / "out")


def test_adapter_config_r_disagrees_with_milora_config(adapter, tmp_path):
    edit_json(adapter / "adapter_config.json", lambda d: d.update(r=8))
    with pytest.raises(AdapterFileError, match="r = 8 but milora_config.json says r = 4.*different adapters"):
        export_adapter(adapter, None, "lora", tmp_path / "out")


@pytest.mark.parametrize("name, keep", [("adapter_model.safetensors", 0.5), ("adapter_model.safetensors", 0),
                                        (INIT_FILE, 0.5)], ids=["weights-truncated", "weights-empty", "init-truncated"])
def test_damaged_safetensors_files(adapter, tmp_path, name, keep):
    """A cut-off download is an AdapterFileError naming the file, not a raw SafetensorError."""
    path = adapter / name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(AdapterFileError, match="damaged") as e:
        export_adapter(adapter, None, "lora", tmp_path / "out")
    assert name in str(e.value)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", INIT_FILE])
def test_damaged_safetensors_files_merged(adapter, tmp_path, name):
    """The merged route (PEFT's loader, then the init factors) reports the same damage."""
    path = adapter / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="damaged"):
        export_adapter(adapter, None, "merged", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_milora_config_that_is_a_json_list(adapter, tmp_path):
    (adapter / "milora_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="must hold a JSON object, not a list"):
        export_adapter(adapter, None, "lora", tmp_path / "out")


def test_cli_missing_init_factors_is_a_usage_error(adapter, tmp_path, capsys):
    """A missing file is exit 2 with the message, not a traceback."""
    (adapter / INIT_FILE).unlink()
    with pytest.raises(SystemExit) as e:
        export_adapter_main(["--adapter", str(adapter), "--to", "lora", "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{INIT_FILE} not found" in err and "Traceback" not in err


def test_export_into_a_non_empty_output_needs_overwrite(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("an earlier export")
    with pytest.raises(ValueError, match="not empty"):
        export_adapter(adapter, None, "lora", out)
    assert (out / "stale.bin").exists()
    export_adapter_main(["--adapter", str(adapter), "--to", "lora", "--output", str(out), "--overwrite"])
    assert not (out / "stale.bin").exists() and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("where", ["adapter", "its parent"])
def test_overwrite_never_removes_the_adapter_itself(adapter, where):
    out = adapter if where == "adapter" else adapter.parent
    before = sorted(p.name for p in adapter.iterdir())
    with pytest.raises(ValueError, match="holds the adapter being exported"):
        export_adapter(adapter, None, "lora", out, overwrite=True)
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_a_failed_overwrite_keeps_the_earlier_export(adapter, tmp_path):
    """The new export is written beside --output and moved in only when complete."""
    out = tmp_path / "out"
    export_adapter(adapter, None, "lora", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (adapter / INIT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="B0/A0 are missing"):
        export_adapter(adapter, None, "lora", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "out.exporting").exists()
    with pytest.raises(ValueError, match="choose one of"):  # the Python API checks `to` before touching anything
        export_adapter(adapter, None, "gguf", out, overwrite=True)
    assert {p.name for p in out.iterdir()} == set(before)


def test_adapter_weights_of_another_shape_are_refused_naming_the_adapter(adapter, tiny_causal_lm_dir):
    """lora_A saved for a wider input than this base has: load_milora names the adapter, not a bare RuntimeError."""
    from milora_vlm.milora import load_milora

    weights = adapter / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 3)
    save_file(state, str(weights))
    with pytest.raises(AdapterFileError, match=f"{adapter}: its adapter weights do not fit this base model"):
        load_milora(load_model("llama", tiny_causal_lm_dir), adapter)


def test_lora_alpha_that_is_not_a_positive_number(adapter, tmp_path):
    for alpha in (0, -8, "8", None):
        edit_json(adapter / "adapter_config.json", lambda d: d.update(lora_alpha=alpha))
        with pytest.raises(AdapterFileError, match=f"lora_alpha = {alpha!r} is not a positive number"):
            export_adapter(adapter, None, "lora", tmp_path / "out")


def test_adapter_weights_of_a_rank_other_than_the_configs(adapter, tmp_path):
    """A and A0 agree with each other (rank 2) but not with r = 4 in both configs: the export would write r = 8."""
    weights, init = adapter / "adapter_model.safetensors", adapter / INIT_FILE
    for path in (weights, init):
        cut = {k: (v[:2] if k.endswith(("lora_A.weight", ".A0")) else v[:, :2] if k.endswith(("lora_B.weight", ".B0"))
                   else v).contiguous() for k, v in load_file(str(path)).items()}
        save_file(cut, str(path))
    with pytest.raises(AdapterFileError, match=r"lora_A has 2 rows, the config says r = 4"):
        export_adapter(adapter, None, "lora", tmp_path / "out")


def test_missing_adapter_weights_are_named(adapter, tmp_path):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match=f"{adapter}: no adapter_model.safetensors"):
        export_adapter(adapter, None, "lora", tmp_path / "out")
