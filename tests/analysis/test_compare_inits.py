"""scripts/compare_inits.py --quick end to end on a tiny LLaVA and a few drawn shapes (new task: shapes, old: colours)."""

from __future__ import annotations

import json
import math
import pathlib
import random

import pytest
import torch
import yaml

from tests.helpers import load_script


def load_compare_inits():
    return load_script("scripts/compare_inits.py", "compare_inits")


def write_jsonl(path: pathlib.Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_shapes_data(folder: pathlib.Path) -> pathlib.Path:
    """12 drawn images; train: shape conversations; test_new: shape questions; test_old: colour questions."""
    from milora_vlm.train.bootstrap import COLOURS, SHAPES, draw_shape

    rng = random.Random(0)
    (folder / "images").mkdir(parents=True)
    images = []
    for i in range(12):
        shape, colour = SHAPES[i % 3], list(COLOURS)[i % 4]
        draw_shape(shape, colour, rng).save(folder / "images" / f"{i}.png")
        images.append((f"{i}.png", shape, colour))
    write_jsonl(folder / "train_new.jsonl", [
        {"id": f"t{i}", "image": img, "conversations": [{"from": "human", "value": "<image>\nWhat shape is in the image?"},
                                                          {"from": "gpt", "value": shape}]}
        for i, (img, shape, _) in enumerate(images)])
    write_jsonl(folder / "test_new.jsonl", [
        {"question_id": f"n{i}", "image": img, "text": "What shape is in the image?", "answer": shape, "category": "shape_open"}
        for i, (img, shape, _) in enumerate(images[:9])])
    write_jsonl(folder / "test_old.jsonl", [
        {"question_id": f"o{i}", "image": img, "text": "What color is the shape?", "answer": colour, "category": "color_open"}
        for i, (img, _, colour) in enumerate(images[:9])])
    return folder


@pytest.mark.slow
def test_quick_study_runs_every_init_and_resumes(tmp_path, tiny_llava_dir):
    data = tiny_shapes_data(tmp_path / "data")
    recipe = {
        "model": {"kind": "llava", "path": str(tiny_llava_dir)},
        "data": {"train_file": str(data / "train_new.jsonl"), "image_folder": str(data / "images"),
                 "template": "vicuna_v1", "max_length": 160},
        "adapter": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
        "trainable": {"projector": "frozen"},
        "training": {"output_dir": str(tmp_path / "unused"), "per_device_train_batch_size": 4, "max_steps": 50,
                     "learning_rate": 1e-3, "logging_steps": 1, "dataloader_num_workers": 0},
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "study"
    script = load_compare_inits()
    threads = torch.get_num_threads()
    try:  # one thread: tiny matrices on a shared CPU are several times faster so (see --threads)
        results = script.main(["--recipe", str(recipe_path), "--output", str(out), "--quick", "--seeds", "3", "4",
                               "--threads", "1"])
    finally:
        torch.set_num_threads(threads)

    assert list(results) == ["base", "lora", "principal", "minor", "full"]
    for group, runs in results.items():
        assert len(runs) == 1  # --quick: the first seed only
        r = runs[0]
        assert 0.0 <= r["new_acc"] <= 100.0 and 0.0 <= r["old_acc"] <= 100.0
        assert math.isfinite(r["forgetting_ce"]) and r["forgetting_ce"] >= 0.0 and 0.0 <= r["agreement"] <= 100.0
        if group == "base":
            assert r["agreement"] == 100.0  # the base against itself
        else:
            assert r["seed"] == 3 and r["subspace_modules"] == 4  # q_proj, v_proj of 2 language-model layers
            assert r["mean/delta_norm"] > 0.0  # two steps moved every adapted weight
            assert (out / "runs" / f"{group}-s3" / "subspace" / "subspace.json").is_file()
            ran = yaml.safe_load((out / "runs" / f"{group}-s3" / "recipe.yaml").read_text())
            assert ran["training"]["max_steps"] == 2 and ran["training"]["seed"] == 3
            assert (ran["adapter"] is None) == (group == "full")
            if group != "full":
                assert ran["adapter"]["init"] == group
    summary = json.loads((out / "results.json").read_text())
    assert summary["meta"]["new_questions_n"] == 8 and summary["meta"]["forgetting_n"] == 8
    assert summary["summary"]["MiLoRA"]["new_acc"]["mean"] == pytest.approx(results["minor"][0]["new_acc"])
    md = (out / "results.md").read_text()
    for name in ("| LoRA |", "| PiSSA |", "| MiLoRA |", "| full FT |", "| minor-s3 |"):
        assert name in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    # a second call finds every result.json and trains nothing
    trained_at = (out / "runs" / "minor-s3" / "result.json").stat().st_mtime
    again = script.main(["--recipe", str(recipe_path), "--output", str(out), "--quick", "--seeds", "3"])
    assert set(again) == set(results)
    assert again["minor"][0]["forgetting_ce"] == results["minor"][0]["forgetting_ce"]
    assert (out / "runs" / "minor-s3" / "result.json").stat().st_mtime == trained_at


def test_forgetting_set_reads_its_images_from_the_question_files_folder(tmp_path, tiny_llava_dir):
    """--image-folder names where the question files' images are; the recipe's data.image_folder may be another
    place (the tiny recipes bootstrap theirs), so the held-out conversations must be read from --image-folder."""
    from milora_vlm.config import build_recipe
    from milora_vlm.model.load import load_for_inference

    data = tiny_shapes_data(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    recipe = build_recipe({"model": {"kind": "llava", "path": str(tiny_llava_dir)},
                           "data": {"train_file": str(data / "train_new.jsonl"), "image_folder": str(tmp_path / "elsewhere"),
                                    "template": "vicuna_v1", "max_length": 160},
                           "adapter": {"r": 4, "lora_alpha": 4}, "training": {"output_dir": str(tmp_path / "out")}})
    from milora_vlm.cli import compare_inits as script

    conversations = script.questions_as_conversations(str(data / "test_old.jsonl"), str(tmp_path / "conv.jsonl"))
    loaded = load_for_inference(str(tiny_llava_dir), dtype="float32")
    batches, skipped = script.forgetting_batches(conversations, recipe, loaded, 4, image_folder=str(data / "images"))
    assert skipped == [] and sum(len(b["input_ids"]) for b in batches) == 9
    with pytest.raises(SystemExit, match="missing_image"):  # the recipe's folder does not hold them
        script.forgetting_batches(conversations, recipe, loaded, 4)
