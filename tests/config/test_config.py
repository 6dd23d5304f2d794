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


# ---------------------------------------------------------------------------------------------------------------
# hostile recipe files: read_yaml / load_recipe fail fast with a ConfigError naming the problem


def recipe_file(files: Path, raw: dict | None = None, replace: tuple[str, str] | None = None) -> Path:
    """base_raw (or `raw`) written as YAML; `replace` swaps one piece of the text (to splice in raw YAML)."""
    text = yaml.safe_dump(base_raw(files) if raw is None else raw)
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    path = files / "recipe.yaml"
    path.write_text(text)
    return path


def alias_bomb(levels: int = 9) -> str:
    """`[&a0 [lol], &a1 [*a0 x9], ..., &a9 [*a8 x9]]`: ~half a kilobyte that expands to 9**9 values."""
    items = ["&a0 [lol]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("key", ["train_file", "target_modules"])
def test_yaml_alias_bomb_fails_fast(files, key):
    """A "billion laughs" recipe is refused from the node graph, before anything expands it."""
    raw = base_raw(files)
    section = "data" if key == "train_file" else "adapter"
    raw[section][key] = "BOMB"
    path = recipe_file(files, raw, (f"{key}: BOMB", f"{key}: {alias_bomb()}"))
    with pytest.raises(ConfigError, match="anchors and aliases expand"):
        load_recipe(path)


def test_yaml_alias_cycle_is_refused(files):
    """`&x [*x]` is a self-containing value (PyYAML builds it); it must not loop or recurse forever."""
    raw = base_raw(files)
    raw["adapter"]["target_modules"] = "CYCLE"
    path = recipe_file(files, raw, ("target_modules: CYCLE", "target_modules: &x [*x]"))
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(path)


def test_modest_anchors_and_aliases_still_load(files):
    """Reusing a value with an alias is legitimate YAML and keeps working."""
    raw = base_raw(files)
    raw["adapter"].update(r="RANK", lora_alpha="ALPHA")
    path = recipe_file(files, raw, ("lora_alpha: ALPHA", "lora_alpha: &rank 16"))  # safe_dump sorts: alpha first
    path.write_text(path.read_text().replace("r: RANK", "r: *rank"))
    r = load_recipe(path)
    assert (r.adapter.r, r.adapter.lora_alpha) == (16, 16)


@pytest.mark.parametrize("text", ["- model\n- data\n", "42\n", "just a string\n"])
def test_recipe_that_is_not_a_mapping(files, text):
    path = files / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_recipe(path)


def test_recipe_with_a_complex_key(files):
    """`? [a, b]` makes a list key; PyYAML would crash hashing it, the loader names the line instead."""
    path = recipe_file(files)
    path.write_text(path.read_text() + "? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="plain name"):
        load_recipe(path)


@pytest.mark.parametrize("encode", [lambda t: t.encode("utf-16"),
                                    lambda t: t.replace("vicuna_v1", "vicuna_v1\xff").encode("latin-1")],
                         ids=["utf16", "latin1-byte"])
def test_recipe_not_utf8(files, encode):
    path = recipe_file(files)
    path.write_bytes(encode(path.read_text()))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(path)


def test_recipe_over_one_mib(files):
    path = recipe_file(files)
    path.write_text(path.read_text() + "#" + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_recipe(path)


@pytest.mark.parametrize("section, key, value", [("training", "learning_rate", float("nan")),
                                                 ("training", "learning_rate", float("inf")),
                                                 ("adapter", "lora_alpha", float("inf"))])
def test_non_finite_numbers_are_refused(files, section, key, value):
    """`.nan` / `.inf` in YAML would only fail mid-run (or silently train nothing)."""
    raw = base_raw(files)
    raw[section][key] = value
    path = recipe_file(files, raw)
    assert ".nan" in path.read_text() or ".inf" in path.read_text()
    with pytest.raises(ConfigError, match=rf"{section}\.{key}.*finite"):
        load_recipe(path)


def test_max_steps_zero_is_refused(files):
    """transformers would still run one step and save that adapter."""
    path = recipe_file(files)
    with pytest.raises(ConfigError, match=r"training\.max_steps: 0"):
        load_recipe(path, [("max_steps", "0")])
    raw = base_raw(files)
    raw["training"]["max_steps"] = 0
    with pytest.raises(ConfigError, match=r"training\.max_steps: 0"):
        load_recipe(recipe_file(files, raw))


@pytest.mark.parametrize("ds, key", [({"fp16": True, "zero_optimization": {"stage": 2}}, "`fp16`"),
                                     ({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
                                      "`zero_optimization.offload_optimizer`")])
def test_deepspeed_section_that_is_not_an_object(files, ds, key):
    (files / "ds.json").write_text(json.dumps(ds))
    raw = base_raw(files)
    raw["deepspeed"] = str(files / "ds.json")
    msg = error_of(raw)
    assert key in msg and "must be a JSON object" in msg, msg


def test_deepspeed_json_nested_too_deep(files):
    """100000 nested arrays: a ConfigError, not a RecursionError."""
    (files / "ds.json").write_text("[" * 100_000 + "]" * 100_000)
    raw = base_raw(files)
    raw["deepspeed"] = str(files / "ds.json")
    assert "nested too deeply" in error_of(raw)


def test_deepspeed_json_duplicate_key(files):
    (files / "ds.json").write_text('{"zero_optimization": {"stage": 2}, "zero_optimization": {"stage": 3}}')
    raw = base_raw(files)
    raw["deepspeed"] = str(files / "ds.json")
    msg = error_of(raw)
    assert "duplicate key" in msg and "zero_optimization" in msg, msg


def test_residual_copy_needs_whole_weights(files):
    """offset_backward 'residual_copy' under ZeRO-3 fails at start naming the fix; ZeRO-2, no DeepSpeed and the
    default backward under ZeRO-3 are accepted; subtract with it is refused by the adapter's own check."""
    raw = base_raw(files)
    raw["adapter"]["offset_backward"] = "residual_copy"
    build_recipe(raw)
    raw["deepspeed"] = str(files / "zero3.json")
    msg = error_of(raw)
    assert "adapter.offset_backward" in msg and "ZeRO-3" in msg and "use 'factors'" in msg, msg
    (files / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    raw["deepspeed"] = str(files / "zero2.json")
    assert build_recipe(raw).adapter.offset_backward == "residual_copy"
    raw["deepspeed"] = str(files / "zero3.json")
    del raw["adapter"]["offset_backward"]
    assert build_recipe(raw).adapter.offset_backward == "factors"
    raw["adapter"].update(offset_backward="residual_copy", residual="subtract")
    assert "remove offset_backward" in error_of(raw)
