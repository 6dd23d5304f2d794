"""Recipe loading: typed sections, overrides, and every kind of error caught before heavy work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from milora_vlm.config import ConfigError, build_recipe, load_recipe, parse_overrides
from tests.helpers import REPO


@pytest.fixture
def files(tmp_path):
    """An existing model dir, train file, image folder and DeepSpeed config to point recipes at."""
    (tmp_path / "model").mkdir()
    (tmp_path / "images").mkdir()
    train = tmp_path / "train.jsonl"
    train.write_text('{"id": "1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n')
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    return tmp_path


def base_raw(files: Path) -> dict:
    return {
        "model": {"kind": "llava", "path": str(files / "model")},
        "data": {"train_file": str(files / "train.jsonl"), "image_folder": str(files / "images"), "template": "vicuna_v1"},
        "adapter": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "trainable": {"projector": "full", "projector_lr": 2e-5},
        "training": {"output_dir": str(files / "out"), "learning_rate": 2e-4, "max_steps": 3},
    }


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        build_recipe(raw)
    return str(e.value)


def test_valid_recipe_types_and_defaults(files):
    r = build_recipe(base_raw(files))
    assert r.adapter.r == 8 and r.adapter.init == "minor" and r.adapter.residual == "offset"
    assert r.trainable.projector_lr == 2e-5 and r.trainable.vision_tower == "frozen"
    assert r.data.image_aspect_ratio == "pad" and r.data.max_length == 2048
    assert r.training["max_steps"] == 3 and r.export == "none" and r.deepspeed is None


def test_unknown_keys_suggest_the_right_one(files):
    raw = base_raw(files)
    raw["adapter"]["lora_alpah"] = 16
    msg = error_of(raw)
    assert "adapter.lora_alpah" in msg and "did you mean 'lora_alpha'" in msg
    raw = base_raw(files)
    raw["training"]["learnig_rate"] = 1e-4
    msg = error_of(raw)
    assert "training.learnig_rate" in msg and "learning_rate" in msg
    raw = base_raw(files)
    raw["adaptor"] = raw.pop("adapter")
    assert "did you mean 'adapter'" in error_of(raw)


def test_wrong_types_name_the_key(files):
    raw = base_raw(files)
    raw["adapter"]["r"] = "sixteen"
    assert "adapter.r" in error_of(raw) and "integer" in error_of(raw)
    raw = base_raw(files)
    raw["data"]["group_by_modality_length"] = "yes"
    assert "data.group_by_modality_length" in error_of(raw)
    raw = base_raw(files)
    raw["training"]["max_steps"] = "ten"
    assert "training.max_steps" in error_of(raw)
    raw = base_raw(files)
    raw["trainable"]["projector"] = "partial"
    assert "trainable.projector" in error_of(raw) and "frozen" in error_of(raw)
    raw = base_raw(files)
    raw["adapter"]["init"] = "minorr"
    assert "init" in error_of(raw)  # MiLoRAConfig's own check, prefixed with the section


def test_missing_paths(files):
    raw = base_raw(files)
    raw["data"]["train_file"] = str(files / "nope.jsonl")
    assert "data.train_file" in error_of(raw) and "nope.jsonl" in error_of(raw)
    raw = base_raw(files)
    raw["model"]["path"] = str(files / "no_model")
    assert "model.path" in error_of(raw)
    raw = base_raw(files)
    raw["deepspeed"] = str(files / "missing.json")
    assert "deepspeed" in error_of(raw)
    raw = base_raw(files)
    raw["data"]["image_folder"] = str(files / "no_images")
    assert "data.image_folder" in error_of(raw)
    raw = base_raw(files)
    raw["training"]["resume_from_checkpoint"] = str(files / "no_ckpt")
    assert "resume_from_checkpoint" in error_of(raw)
    # bootstrap: tiny makes missing model and data acceptable (they get built)
    raw = base_raw(files)
    raw["model"]["path"], raw["data"]["train_file"], raw["bootstrap"] = str(files / "m2"), str(files / "d2.jsonl"), "tiny"
    build_recipe(raw)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda r: r.update(adapter=None, trainable={"projector": "frozen"}), ["nothing to train"]),
        (lambda r: r.update(adapter=None, trainable={"projector": "milora"}), ["trainable.projector", "adapter"]),
        (lambda r: r["trainable"].update(projector="frozen", projector_lr=1e-4), ["projector_lr", "frozen"]),
        (lambda r: r["trainable"].update(language_model="full"), ["language_model", "adapter"]),
        (lambda r: r["model"].update(kind="causal_lm"), ["causal_lm", "trainable.projector"]),
        (lambda r: (r["model"].update(kind="causal_lm"), r["trainable"].update(projector="frozen", projector_lr=None),
                    r["data"].update(template="plain", image_folder=None)), ["plain"]),
        (lambda r: r["model"].update(language_model="lmsys/vicuna-7b-v1.5"), ["vision_tower"]),
        (lambda r: r["training"].update(deepspeed="configs/zero2.json"), ["top-level `deepspeed:`"]),
        (lambda r: r["training"].update(remove_unused_columns=True), ["remove_unused_columns"]),
        (lambda r: r["data"].update(template="vicuna"), ["unknown template", "vicuna_v1"]),
        (lambda r: r.update(export="merged", adapter=None), ["export"]),
        (lambda r: r["training"].pop("output_dir"), ["output_dir"]),
        (lambda r: r["adapter"].update(modules_to_save=["lm_head"]), ["derived", "trainable.projector"]),
    ],
)
def test_bad_combinations(files, change, words):
    raw = base_raw(files)
    change(raw)
    msg = error_of(raw)
    for w in words:
        assert w in msg, msg


def test_overrides_parse_and_apply(files):
    path = files / "recipe.yaml"
    path.write_text(yaml.safe_dump(base_raw(files)))
    argv = ["--local_rank=1", "--config", str(path), "--adapter.r", "64", "--max_steps", "7",
            "--adapter.target_modules", "[q_proj, k_proj]", "--training.seed=3", "--data.group_by_modality_length",
            "--run_name", "2024", "--warmup_ratio", "0.03", "--trainable.projector_lr", "1e-5"]
    config, pairs = parse_overrides(argv)
    assert config == str(path)
    r = load_recipe(config, pairs)
    assert r.adapter.r == 64 and r.adapter.target_modules == ["q_proj", "k_proj"]
    assert r.training["max_steps"] == 7 and r.training["seed"] == 3 and r.training["run_name"] == "2024"
    assert r.data.group_by_modality_length is True and r.trainable.projector_lr == 1e-5
    assert r.training["warmup_steps"] == 0.03  # transformers 5: a ratio is a warmup_steps value < 1
    with pytest.raises(ConfigError, match="did you mean 'adapter.r'|did you mean"):
        load_recipe(config, [("adapter.rr", "3")])
    with pytest.raises(ConfigError, match="max_steps"):
        load_recipe(config, [("max_step", "3")])
    with pytest.raises(ConfigError, match="adapter.r"):
        load_recipe(config, [("adapter.r", "abc")])
    full = load_recipe(config, [("adapter", "null"), ("trainable.language_model", "full")])  # full finetuning
    assert full.adapter is None and full.trainable.language_model == "full"
    with pytest.raises(ConfigError, match="only null"):
        load_recipe(config, [("adapter", "64")])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["--config", "x", "stray"])


def test_saved_recipe_reloads_identically(files):
    r = build_recipe(base_raw(files))
    r.save(files / "out")
    again = load_recipe(files / "out" / "milora_recipe.yaml")
    assert again.to_dict() == r.to_dict()
    assert os.path.isabs(again.model.path) and os.path.isabs(again.data.train_file)


def test_shipped_recipes_are_valid_and_carry_the_paper_settings(files):
    proj = files / "mm_projector.bin"
    proj.write_bytes(b"")
    common = [("data.train_file", str(files / "train.jsonl")), ("output_dir", str(files / "out"))]
    img = [("data.image_folder", str(files / "images")), ("model.projector_weights", str(proj))]
    cfg = REPO / "configs"
    milora = load_recipe(cfg / "llava15_7b_milora.yaml", common + img)
    assert (milora.adapter.r, milora.adapter.lora_alpha, milora.adapter.init) == (128, 128, "minor")
    assert milora.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert milora.training["learning_rate"] == 2e-4 and milora.trainable.projector_lr == 2e-5
    assert milora.training["lr_scheduler_type"] == "cosine" and milora.training["warmup_steps"] == 0.03
    assert milora.training["per_device_train_batch_size"] == 16 and milora.training["num_train_epochs"] == 1
    assert milora.data.max_length == 2048 and milora.data.image_aspect_ratio == "pad"
    assert milora.model.vision_feature_layer == -2 and milora.model.projector == "mlp2x_gelu"
    assert milora.deepspeed.endswith("zero3.json") and milora.training["gradient_checkpointing"] is True
    lora = load_recipe(cfg / "llava15_7b_lora.yaml", common + img)
    assert (lora.adapter.init, lora.adapter.lora_alpha) == ("lora", 256)
    pissa = load_recipe(cfg / "llava15_7b_pissa.yaml", common + img)
    assert (pissa.adapter.init, pissa.adapter.lora_alpha) == ("principal", 128)
    cs = load_recipe(cfg / "llama2_7b_commonsense_milora.yaml", common)
    assert (cs.adapter.r, cs.adapter.lora_alpha, cs.adapter.lora_dropout) == (32, 32, 0.05)
    assert cs.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert cs.training["learning_rate"] == 3e-4 and cs.training["lr_scheduler_type"] == "linear"
    assert cs.training["warmup_steps"] == 100 and cs.training["num_train_epochs"] == 3
    assert cs.training["per_device_train_batch_size"] * cs.training["gradient_accumulation_steps"] == 16
    assert cs.data.template == "alpaca" and cs.data.max_length == 256
    mm = load_recipe(cfg / "llama2_7b_metamath_milora.yaml", common)
    assert (mm.adapter.r, mm.adapter.lora_alpha, mm.data.max_length) == (64, 64, 2048)
    assert mm.deepspeed.endswith("zero2.json") and mm.training["learning_rate"] == 3e-4
    stage1 = load_recipe(cfg / "llava15_7b_stage1_projector.yaml", common + img[:1])
    assert stage1.adapter is None and stage1.data.template == "plain" and stage1.trainable.projector == "full"
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        ds = json.loads((cfg / name).read_text())
        assert "optimizer" not in ds  # the Trainer builds it (projector learning-rate groups)
        assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert json.loads((cfg / "zero3.json").read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_cli_reports_config_errors_before_loading_anything(files):
    path = files / "recipe.yaml"
    raw = base_raw(files)
    raw["adapter"]["rank"] = 8
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_vlm.py"), "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "adapter.rank" in proc.stderr and "did you mean" in proc.stderr


def test_help_prints_every_field_with_its_help_and_choices(capsys):
    """`train_vlm.py --help` shows each recipe key's help and choices as declared next to the field, and lists the
    registered inits, projectors and templates (so a newly registered one shows up without editing the help)."""
    import dataclasses

    from milora_vlm.config.schema import _ADAPTER_DERIVED, _SCALARS, _SECTIONS, Recipe
    from milora_vlm.milora import INITS
    from milora_vlm.train.pipeline import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # help text is wrapped to the terminal width
    keys = [(f"{name}.{f.name}", f) for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
            if not (name == "adapter" and f.name in _ADAPTER_DERIVED)]
    keys += [(f.name, f) for f in dataclasses.fields(Recipe) if f.name in _SCALARS]
    assert len(keys) >= 40
    for key, f in keys:
        assert f"{key}:" in out, key
        assert f.metadata.get("help"), f"{key} declares no help"
        assert " ".join(f.metadata["help"].split()) in flat, key
        choices = f.metadata.get("choices")
        if choices:
            assert f"{key}: {'|'.join(choices)}" in out, key
    assert "adapter.init: minor|principal|middle|random|lora = 'minor'" in out
    for name in ("minor", "principal", "middle", "random", "lora"):
        assert " ".join(f"{name}: {INITS[name].help}".split()) in flat
    assert "data.template: vicuna_v1|llama3|chatml|plain|alpaca" in out
    assert "model.projector: mlp2x_gelu|linear" in out
    assert "training:" in out and "TrainingArguments" in out


def test_unknown_registered_name_lists_the_registered_ones(files):
    raw = base_raw(files)
    raw["model"]["projector"] = "mlp3x_gelu"
    with pytest.raises(ConfigError, match="model.projector: unknown projector 'mlp3x_gelu'; registered: mlp2x_gelu, linear"):
        build_recipe(raw)
    raw = base_raw(files)
    raw["adapter"]["init"] = "pissa"
    with pytest.raises(ConfigError, match="adapter.init: unknown init 'pissa'; registered: minor, principal, middle"):
        build_recipe(raw)
