"""The paper recipes on any hardware, and errors that name their real cause (issue 12, points 3 and 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from milora_vlm.config import ConfigError, load_recipe
from tests.helpers import REPO, load_script

PAPER_RECIPE = REPO / "configs" / "llava15_7b_milora.yaml"


def _paper_recipe(tmp_path, model_path, train_file, image_folder, *extra):
    """configs/llava15_7b_milora.yaml with only the model and data paths overridden (paths relative to tmp_path)."""
    return [str(PAPER_RECIPE), "--model.path", str(model_path), "--data.train_file", str(train_file),
            "--data.image_folder", str(image_folder), *extra]


def test_tf32_is_switched_off_with_one_line_where_unsupported(tmp_path, monkeypatch):
    from milora_vlm.train import pipeline

    recipe = load_recipe(*_split(_paper_recipe(tmp_path, tmp_path, _data(tmp_path), tmp_path / "img", "--deepspeed", "null")))
    monkeypatch.setattr("transformers.utils.is_torch_tf32_available", lambda: False)
    notes = pipeline.resolve_hardware(recipe)
    assert recipe.training["tf32"] is False
    assert len(notes) == 1 and "training.tf32" in notes[0] and "tf32 false" in notes[0]


@pytest.mark.parametrize("key,value,cuda,match", [
    ("training.fp16", True, False, "--training.fp16 false"),
    ("training.bf16", True, True, "--training.bf16 false --training.fp16 true"),
    ("model.dtype", "bfloat16", True, "--model.dtype auto"),
])
def test_precision_the_hardware_lacks_is_refused_naming_key_and_fix(tmp_path, monkeypatch, key, value, cuda, match):
    from milora_vlm.train import pipeline

    recipe = load_recipe(*_split(_paper_recipe(tmp_path, tmp_path, _data(tmp_path), tmp_path / "img", "--deepspeed", "null")))
    section, name = key.split(".")
    if section == "training":
        recipe.training[name] = value
    else:
        setattr(recipe.model, name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr("transformers.utils.is_torch_bf16_gpu_available", lambda: False)
    with pytest.raises(ConfigError, match=key) as e:
        pipeline.resolve_hardware(recipe)
    assert match in str(e.value)


def _split(argv):
    from milora_vlm.config import parse_overrides

    config, pairs = parse_overrides(["--config", *argv])
    return config, pairs


def _data(tmp_path, n=4):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (20, 14), (200, 30, 30)).save(tmp_path / "img" / "red.png")
    recs = [{"id": str(i), "image": "red.png",
             "conversations": [{"from": "human", "value": "What color is the shape?\n<image>"},
                               {"from": "gpt", "value": "red"}]} for i in range(n)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    return path


def test_misspelt_model_path_names_model_path_not_the_projector(tmp_path):
    real = tmp_path / "llava-v1.5-7b-composed"
    real.mkdir()
    typo = tmp_path / "llava-v1.5-7b-compsed"
    with pytest.raises(ConfigError) as e:
        load_recipe(*_split(_paper_recipe(tmp_path, typo, _data(tmp_path), tmp_path / "img", "--deepspeed", "null")))
    msg = str(e.value)
    assert "model.projector_weights" in msg and f"model.path {str(typo)!r} does not exist" in msg
    assert f"did you mean {str(real)!r}" in msg


def test_checkpoint_without_processor_config_is_a_clear_error(tmp_path, tiny_llava_dir):
    from types import SimpleNamespace

    from milora_vlm.data.validation import image_tokens_from_processor
    from milora_vlm.model.load import load_for_training

    ckpt = tmp_path / "old_llava_hf"
    shutil.copytree(tiny_llava_dir, ckpt)
    cfg = json.loads((ckpt / "processor_config.json").read_text())
    # an llava-hf save from before processor_config.json: the image processor in preprocessor_config.json only
    (ckpt / "preprocessor_config.json").write_text(json.dumps(cfg["image_processor"]))
    (ckpt / "processor_config.json").unlink()
    model_cfg = SimpleNamespace(kind="llava", path=str(ckpt), attn_implementation=None)
    for call in (lambda: load_for_training(model_cfg, torch.float32), lambda: image_tokens_from_processor(str(ckpt))):
        with pytest.raises(ConfigError) as e:
            call()
        assert "processor_config.json" in str(e.value) and '"patch_size": 8' in str(e.value)
    proc = subprocess.run([sys.executable, str(REPO / "data_prep" / "llava_instruct.py"), "--input",
                           str(_data(tmp_path)), "--output", str(tmp_path / "out.jsonl"), "--tokenizer", str(ckpt),
                           "--max-length", "64"], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2 and "processor_config.json" in proc.stderr and "Traceback" not in proc.stderr


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.slow
def test_paper_llava_recipe_starts_on_cpu_with_only_paths_overridden(tmp_path, tiny_tokenizer):
    """configs/llava15_7b_milora.yaml (ZeRO-3, tf32, r 128, gradient checkpointing, 4 dataloader workers) runs
    its first step on this CPU machine: tf32 is switched off with one line, nothing else changes."""
    from milora_vlm.model.tiny import build_tiny_llava

    model_dir = tmp_path / "tiny_llava_128"  # r 128 needs matrices at least 128 wide
    model, processor = build_tiny_llava(tiny_tokenizer, text_hidden=128)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "zero3.json", tmp_path / "configs" / "zero3.json")  # the recipe's relative path
    argv = _paper_recipe(tmp_path, model_dir, _data(tmp_path, 16), tmp_path / "img", "--max_steps", "1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_vlm.py"), "--config", *argv],
                          cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Traceback" not in out
    assert sum("training.tf32: true needs" in line for line in out.splitlines()) == 1
    saved = (tmp_path / "runs" / "llava15_7b_milora" / "milora_recipe.yaml").read_text()
    assert "tf32: false" in saved


def test_merged_export_reads_base_from_adapter_config_and_carries_the_recipe(tiny_causal_lm_dir, tmp_path):
    
    from transformers import AutoModelForCausalLM

    from milora_vlm.model.load import recipe_template
    from milora_vlm.milora import MiLoRAConfig, apply_milora, save_milora

    model = apply_milora(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir),
                         MiLoRAConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    run = tmp_path / "run"
    save_milora(model, run / "checkpoint-1")  # a checkpoint inside a run's output_dir, which holds the recipe
    (run / "milora_recipe.yaml").write_text("data:\n  template: alpaca\n")
    cli = load_script("scripts/export_adapter.py", "export_cli")
    cli.main(["--adapter", str(run / "checkpoint-1"), "--to", "merged", "--output", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert recipe_template(tmp_path / "merged") == "alpaca"


def test_resume_with_other_total_steps_says_the_schedule_is_stitched(caplog):
    from types import SimpleNamespace

    from milora_vlm.train.callbacks import StitchedScheduleNote

    args = SimpleNamespace(lr_scheduler_type="cosine")
    note = StitchedScheduleNote("out/checkpoint-500", 1000)
    note.on_train_begin(args, SimpleNamespace(max_steps=1000, is_world_process_zero=True), None)
    assert note.message is None
    with caplog.at_level("WARNING"):
        note.on_train_begin(args, SimpleNamespace(max_steps=2000, is_world_process_zero=True), None)
    assert "stitched" in note.message and "1000" in note.message and "2000" in note.message
    assert note.message in caplog.text
