"""milora_vlm.model.load: what a directory holds, and loading it in the right class / with the right adapter loader."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from milora_vlm.export import export_merged
from milora_vlm.milora import MiLoRAConfig, apply_milora, save_milora
from milora_vlm.model.load import (
    adapter_base,
    checkpoint_kind,
    is_adapter_dir,
    load_adapter,
    load_base,
    resolve_dtype,
)


@pytest.fixture
def milora_dir(tiny_causal_lm_dir, tmp_path):
    model = apply_milora(load_base(tiny_causal_lm_dir, torch.float32),
                         MiLoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # "trained": an update that is not zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(2.0)
    save_milora(model, tmp_path / "milora")
    return tmp_path / "milora", model.eval()


def test_full_models_are_told_apart_and_loaded_in_their_class(tiny_llava_dir, tiny_causal_lm_dir):
    assert checkpoint_kind(tiny_llava_dir) == "llava" and checkpoint_kind(tiny_causal_lm_dir) == "causal_lm"
    assert not is_adapter_dir(tiny_llava_dir)
    assert type(load_base(tiny_llava_dir, torch.float32)) is LlavaForConditionalGeneration
    lm = load_base(tiny_causal_lm_dir, "auto")
    assert type(lm) is LlamaForCausalLM and not lm.training


def test_milora_dir_loads_with_load_milora(milora_dir, tiny_causal_lm_dir):
    path, trained = milora_dir
    assert checkpoint_kind(path) == "milora" and is_adapter_dir(path)
    assert adapter_base(path) == str(tiny_causal_lm_dir)
    with pytest.raises(ValueError, match="adapter directory"):
        load_base(path, torch.float32)
    loaded = load_adapter(load_base(tiny_causal_lm_dir, torch.float32), path).eval()
    assert loaded.milora_config.init == "minor"  # load_milora's, not plain PEFT's (which refuses the directory)
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_plain_peft_dir_loads_with_peft(tiny_causal_lm_dir, tmp_path):
    model = get_peft_model(load_base(tiny_causal_lm_dir, torch.float32), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "lora")
    assert checkpoint_kind(tmp_path / "lora") == "peft"
    loaded = load_adapter(load_base(tiny_causal_lm_dir, torch.float32), tmp_path / "lora")
    assert isinstance(loaded, PeftModel) and not hasattr(loaded, "milora_config")


def test_merged_export_is_a_full_model_of_its_base_class(milora_dir, tiny_causal_lm_dir, tmp_path):
    path, _ = milora_dir
    export_merged(path, tiny_causal_lm_dir, tmp_path / "merged")
    assert checkpoint_kind(tmp_path / "merged") == "causal_lm"
    with pytest.raises(ValueError, match="full model"):
        load_adapter(load_base(tiny_causal_lm_dir, torch.float32), tmp_path / "merged")


def test_directories_that_hold_nothing_loadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a MiLoRA / PEFT adapter"):
        checkpoint_kind(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="names no base_model_name_or_path; pass --base"):
        adapter_base(tmp_path)


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (a mistyped local path must not become a hub lookup)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("path", ["nope", "./x/y/z", "a/b/c"])
def test_missing_local_path_is_not_looked_up_on_the_hub(no_network, tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        checkpoint_kind(path)


def test_adapter_naming_a_missing_base_fails_with_no_such_directory(no_network, milora_dir, tmp_path):
    from milora_vlm.model.load import load_for_inference

    path, _ = milora_dir
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "moved_away")
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="moved_away: no such directory"):
        load_for_inference(str(path))
    with pytest.raises(FileNotFoundError, match="nope: no such directory"):
        load_for_inference(str(path), base="nope")


@pytest.fixture
def question_file(tmp_path):
    q = tmp_path / "questions.jsonl"
    q.write_text('{"question_id": 1, "text": "What color is the shape?"}\n'
                 '{"question_id": 2, "text": "What shape is in the image?"}\n')
    return q


def test_generate_cli_missing_model_is_exit_2(no_network, question_file, tmp_path, monkeypatch, capsys):
    """A mistyped --model is one "error:" line and exit status 2, not a traceback."""
    from milora_vlm.cli.generate import main

    monkeypatch.chdir(tmp_path)
    answers = tmp_path / "answers.jsonl"
    rc = main(["--model", "nope", "--question-file", str(question_file), "--answers-file", str(answers),
               "--template", "vicuna_v1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: nope" in err and "Traceback" not in err
    assert not answers.exists()


def test_generate_cli_chunk_index_out_of_range_is_exit_2(question_file, tmp_path, capsys):
    from milora_vlm.cli.generate import main

    rc = main(["--model", "nope", "--question-file", str(question_file), "--answers-file", str(tmp_path / "a.jsonl"),
               "--num-chunks", "2", "--chunk-idx", "2", "--no-progress"])
    assert rc == 2 and "error: chunk index 2 is not in [0, 2)" in capsys.readouterr().err
