"""The embedded easy-VQA demo: data conversion, the stage-0 base builder, and scripts/demo.sh end to end on a
cut-down size (a few steps and samples; the real sizes and their accuracies are in the README)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from milora_vlm.demo.easyvqa import (
    Question,
    QuestionError,
    balance_yes_no,
    classify_question,
    convert,
    image_labels,
    is_negated,
)
from tests.helpers import REPO


def q(text: str, answer: str, image_id: int = 0, index: int = 0) -> Question:
    return Question("train", index, text, answer, image_id, classify_question(text, answer))


@pytest.mark.parametrize("text, answer, category", [
    ("what color is the shape?", "red", "color_open"),
    ("what is the blue shape?", "circle", "shape_open"),
    ("is there a red shape?", "no", "color_yesno"),
    ("is there not a red shape in the image?", "yes", "color_yesno"),
    ("does the image contain a circle?", "yes", "shape_yesno"),
    ("is no triangle present?", "no", "shape_yesno"),
])
def test_questions_are_classified_by_attribute_and_form(text, answer, category):
    assert classify_question(text, answer) == category


@pytest.mark.parametrize("text, answer, words", [
    ("is there a red circle?", "yes", "both"),
    ("is there a shape?", "no", "neither"),
    ("what is the shape?", "purple", "unknown answer"),
    ("where is the shape?", "red", "not a 'what' question"),
])
def test_unclassifiable_questions_say_why(text, answer, words):
    with pytest.raises(QuestionError, match=words):
        classify_question(text, answer)


def test_image_labels_follow_negation_and_elimination_and_drop_conflicts():
    questions = [
        q("what color is the shape?", "teal", image_id=1),
        q("is there not a circle?", "yes", image_id=1),  # rules circle out
        q("is there a rectangle in the image?", "no", image_id=1),  # rules rectangle out -> triangle
        q("is no red shape present?", "no", image_id=2),  # negated + "no" affirms red
        q("does the image contain a circle?", "yes", image_id=2),
        q("what color is the shape?", "red", image_id=3),
        q("what color is the shape?", "blue", image_id=3),  # conflict: image 3 dropped
    ]
    labels, conflicts = image_labels(questions)
    assert labels == {1: {"color": "teal", "shape": "triangle"}, 2: {"color": "red", "shape": "circle"}}
    assert len(conflicts) == 1 and "image 3" in conflicts[0] and "red vs blue" in conflicts[0]
    assert is_negated("is no red shape present?") and not is_negated("is there a red shape?")


def test_yes_no_balance_evens_each_category_and_polarity_and_keeps_open_questions():
    rng = random.Random(0)
    questions = ([q("is there a red shape?", "no", index=i) for i in range(7)]
                 + [q("is there a red shape?", "yes", index=10 + i) for i in range(2)]
                 + [q("is there not a red shape?", "yes", index=20 + i) for i in range(5)]
                 + [q("is there not a red shape?", "no", index=30 + i) for i in range(3)]
                 + [q("does the image contain a circle?", "yes", index=40)]  # no "no" at all: dropped
                 + [q("what color is the shape?", "red", index=50 + i) for i in range(4)])
    kept, dropped = balance_yes_no(questions, rng)
    groups = Counter((x.category, is_negated(x.text), x.answer) for x in kept)
    assert groups == {("color_yesno", False, "no"): 2, ("color_yesno", False, "yes"): 2,
                      ("color_yesno", True, "yes"): 3, ("color_yesno", True, "no"): 3, ("color_open", False, "red"): 4}
    assert dropped == {"color_yesno/plain/no": 5, "color_yesno/negated/yes": 2, "shape_yesno/plain/yes": 1}
    assert [x.index for x in kept] == sorted(x.index for x in kept)  # order kept
    assert balance_yes_no(questions, random.Random(0)) == (kept, dropped)  # seeded


def test_convert_default_split_is_open_colour_then_open_shape_questions(tmp_path):
    summary = convert(str(tmp_path), copy_images=False)
    assert {f: e["categories"] for f, e in summary["families"].items()} == {"old": ["color_open"], "new": ["shape_open"]}
    for fam, answers in (("old", {"red", "green", "blue", "yellow", "teal", "brown", "gray", "black"}),
                         ("new", {"circle", "rectangle", "triangle"})):
        train = [json.loads(line) for line in open(tmp_path / f"train_{fam}.jsonl")]
        test = [json.loads(line) for line in open(tmp_path / f"test_{fam}.jsonl")]
        assert len(train) == summary["families"][fam]["train"] > 4000 and len(test) == summary["families"][fam]["test"]
        assert {r["conversations"][1]["value"] for r in train} == answers == {t["answer"] for t in test}
        assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in train)
        assert all(r["image"].startswith("train/") for r in train) and all(t["image"].startswith("test/") for t in test)
    labels = [json.loads(line) for line in open(tmp_path / "image_labels.jsonl")]
    assert sum(r["split"] == "train" for r in labels) == summary["image_labels"]["train"] > 3900
    # stage 2's data: every new-family record plus 40% as many old-family ones, each once
    new = {json.loads(line)["id"] for line in open(tmp_path / "train_new.jsonl")}
    old = {json.loads(line)["id"] for line in open(tmp_path / "train_old.jsonl")}
    mixed = [json.loads(line)["id"] for line in open(tmp_path / "train_new_replay.jsonl")]
    assert len(mixed) == len(set(mixed)) == len(new) + round(0.4 * len(new))
    assert new <= set(mixed) and set(mixed) - new <= old
    assert summary["replay"] == {"fraction": 0.4, "new": len(new), "old_replayed": round(0.4 * len(new)),
                                 "file": "train_new_replay.jsonl"}
    with pytest.raises(ValueError, match="replay must be a fraction"):
        convert(str(tmp_path / "x"), replay=1.5, copy_images=False)


def test_convert_attribute_split_balances_training_yes_no_answers_only(tmp_path):
    summary = convert(str(tmp_path), split_by="attribute", copy_images=False)
    fams = summary["families"]
    assert set(fams["old"]["categories"]).isdisjoint(fams["new"]["categories"])
    for fam in ("old", "new"):
        train = [json.loads(line) for line in open(tmp_path / f"train_{fam}.jsonl")]
        yes_no = Counter((is_negated(r["conversations"][0]["value"]), r["conversations"][1]["value"]) for r in train
                         if r["conversations"][1]["value"] in ("yes", "no"))
        assert yes_no[False, "yes"] == yes_no[False, "no"] > 0 and yes_no[True, "yes"] == yes_no[True, "no"] > 0
        assert sum(fams[fam]["balance_dropped"].values()) > 0
    # the test questions keep the package's own (unbalanced) answer mix
    test_old = Counter((is_negated(r["text"]), r["answer"]) for r in map(json.loads, open(tmp_path / "test_old.jsonl")))
    assert test_old[False, "no"] > 4 * test_old[False, "yes"] and test_old[True, "yes"] > 4 * test_old[True, "no"]


def _cut_down_env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", NUM_GPUS="0", PYTHON=sys.executable, MASTER_PORT=str(29500 + os.getpid() % 400),
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        DEMO_MAX_TRAIN="96", DEMO_EVAL_LIMIT="12", DEMO_TRAIN_ARGS="--max_steps 3 --logging_steps 1",
        DEMO_BASE_ARGS=("--vision-hidden 32 --vision-layers 1 --text-hidden 32 --text-layers 1 --vision-epochs 1 "
                        "--align-epochs 1 --knowledge-epochs 1 --max-images 64 --max-questions 64 "
                        "--check-questions 8 --batch-size 16 --patch-size 16"),
    )
    return env


@pytest.mark.slow
def test_demo_script_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "demo"
    (out / "eval").mkdir(parents=True)
    for model in ("base", "milora"):  # a previous run's answers must not be taken for this run's
        with open(out / "eval" / f"answers_{model}.jsonl", "w") as f:
            f.writelines(json.dumps({"question_id": f"test-{i}", "text": "stale"}) + "\n" for i in range(20000))
    proc = subprocess.run(["bash", "scripts/demo.sh", str(out)], cwd=REPO, env=_cut_down_env(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for key in ("base_old_task_accuracy", "old_task_accuracy", "new_task_accuracy", "base_new_task_accuracy"):
        assert 0.0 <= results[key] <= 100.0
    assert results["questions"] == {"old": 12, "new": 12}
    assert results["wall_seconds"] > 0 and set(results["stage_seconds"]) == {"data", "base", "train", "eval"}
    assert results["training"]["steps"] == 3
    assert "old task (colour)" in (out / "results.md").read_text() and "old task (colour)" in proc.stdout
    for png in ("accuracy.png", "milora/loss_curve.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    events = [f for _, _, files in os.walk(out / "milora") for f in files if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard logs under the MiLoRA run"
    base_info = json.loads((out / "base" / "demo_base.json").read_text())
    assert base_info["spec"]["text_hidden"] == 32  # the cut-down base, saved with how it was made
    assert base_info["knowledge"]["caption_prompt"] == "describe the image."  # captions asked as questions
    assert base_info["knowledge"]["samples"] == 64 + base_info["knowledge"]["captions_mixed_in"] > 64
    # every test question answered once, for both models
    for model in ("base", "milora"):
        answers = [json.loads(line) for line in open(out / "eval" / f"answers_{model}.jsonl")]
        assert len(answers) == len({a["question_id"] for a in answers}) == 24
        assert all(a["text"] != "stale" for a in answers)

    # the base model is reused when present
    from scripts.build_demo_base import main as build_main

    before = (out / "base" / "model.safetensors").stat().st_mtime_ns
    assert build_main(["--data", str(out / "data"), "--output", str(out / "base")]) == 0
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == before


def test_caption_records_are_plain_for_alignment_and_asked_for_the_instruction_mix():
    from milora_vlm.demo.base_model import caption_records

    labels = [{"image": "a.png", "color": "red", "shape": "circle"}, {"image": "b.png", "color": "blue"}]
    plain, asked = caption_records(labels), caption_records(labels, "describe the image.")
    assert len(plain) == len(asked) == 1  # b.png's shape is unknown: no caption
    assert plain[0]["conversations"] == [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red circle"}]
    assert asked[0]["conversations"][0]["value"] == "<image>\ndescribe the image."
    assert asked[0]["conversations"][1] == plain[0]["conversations"][1]
    assert caption_records(labels, "") == plain  # --caption-prompt "": stage 3 keeps the plain captions


def test_knowledge_mix_asks_the_captions_in_the_chat_template_by_default():
    from milora_vlm.demo.base_model import BaseModelSpec, caption_records, knowledge_mix

    labels = [{"image": "a.png", "color": "red", "shape": "circle"}]
    questions = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                                                      {"from": "gpt", "value": "red"}]}]
    spec = BaseModelSpec()
    assert knowledge_mix(questions, labels, spec) == [
        (questions, "chatml"), (caption_records(labels, "describe the image."), "chatml")]
    assert knowledge_mix(questions, labels, BaseModelSpec(caption_prompt="")) == [
        (questions, "chatml"), (caption_records(labels), "plain")]
    assert knowledge_mix(questions, labels, BaseModelSpec(knowledge_with_captions=False)) == [(questions, "chatml")]


def test_report_names_the_missing_step(tmp_path):
    from scripts.demo_report import main as report_main

    (tmp_path / "eval").mkdir()
    with pytest.raises(SystemExit, match=r"score_base_old\.json: missing"):
        report_main(["report", "--output", str(tmp_path)])


def test_subset_is_seeded_and_keeps_file_order(tmp_path):
    from scripts.demo_report import subset

    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"question_id": i}) + "\n" for i in range(50)))
    assert subset(str(src), 10, str(tmp_path / "a.jsonl")) == 10
    assert subset(str(src), 10, str(tmp_path / "b.jsonl")) == 10
    a = [json.loads(line)["question_id"] for line in open(tmp_path / "a.jsonl")]
    assert a == sorted(a) and (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert subset(str(src), 100, str(tmp_path / "c.jsonl")) == 50
