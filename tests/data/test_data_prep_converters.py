"""data_prep converters on small files in each official format (written here): prompts, targets, image paths,
and every unusable entry counted with its id and position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from milora_vlm.data.templates import encode_conversation, render_pieces, get_template
from tests.helpers import load_script

SHORT = "Answer the question using a single word or phrase."


def load_prep(name: str):
    """Import data_prep/<name>.py as a module."""
    return load_script(f"data_prep/{name}.py", f"data_prep_{name}")


from milora_vlm.cli import prep_vqa as vqa  # noqa: E402  (the tool; data_prep/vqa_to_conversations.py wraps it)
commonsense = load_prep("commonsense170k")
metamath = load_prep("metamathqa")
llava_instruct = load_prep("llava_instruct")


def write_json(path: Path, doc) -> str:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return str(path)


def read_output(path: Path):
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    report = json.loads(path.with_name(path.name.replace(".jsonl", ".report.json")).read_text(encoding="utf-8"))
    return records, report


def by_reason(report) -> dict:
    return {i["reason"]: (i["id"], i.get("index"), i.get("line")) for i in report["issues"]}


# -- VQAv2 ---------------------------------------------------------------------------------------------------------

def vqav2_files(tmp_path):
    def answers(*words):
        return [{"answer": w, "answer_confidence": "yes", "answer_id": k + 1} for k, w in enumerate(words)]

    questions = {"data_subtype": "train2014", "questions": [
        {"image_id": 42, "question": "What color is the bus?", "question_id": 42000},
        {"image_id": 42, "question": "How many wheels?", "question_id": 42001},
        {"image_id": 7, "question": "Is it raining?", "question_id": 7000},
        {"image_id": 7, "question": "Nobody annotated me?", "question_id": 7001},
        {"image_id": 9, "question": "Blank answers?", "question_id": 9000},
        {"image_id": "9", "question": "String image id?", "question_id": 9001},
    ]}
    annotations = {"data_subtype": "train2014", "annotations": [
        {"question_id": 42000, "image_id": 42, "answers": answers(*["red"] * 6, *["blue"] * 4)},
        # a tie: "4" and "four" both 5 times; "4" is given first, so it wins
        {"question_id": 42001, "image_id": 42, "answers": answers("4", "four", "4", "four", "4", "four", "4", "four", "4", "four")},
        {"question_id": 7000, "image_id": 7, "answers": answers(*["no"] * 3, *["yes"] * 7)},
        {"question_id": 9000, "image_id": 9, "answers": answers(*[" "] * 10)},
    ]}
    return write_json(tmp_path / "q.json", questions), write_json(tmp_path / "a.json", annotations)


def test_vqav2(tmp_path):
    q, a = vqav2_files(tmp_path)
    out = tmp_path / "vqav2.jsonl"
    assert vqa.main(["--format", "vqav2", "--questions", q, "--annotations", a, "--output", str(out)]) == 0
    records, report = read_output(out)
    assert records[0] == {"id": "42000", "image": "COCO_train2014_000000000042.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nWhat color is the bus?\n{SHORT}"}, {"from": "gpt", "value": "red"}]}
    assert [r["conversations"][1]["value"] for r in records] == ["red", "4", "yes"]
    assert report["records_read"] == 6 and report["records_written"] == 3
    assert by_reason(report) == {"no_annotation": ("7001", 4, None), "no_answer": ("9000", 5, None),
                                 "bad_image_id": ("9001", 6, None)}


def test_vqav2_group_by_image_and_llava_layout(tmp_path):
    q, a = vqav2_files(tmp_path)
    out = tmp_path / "grouped.jsonl"
    assert vqa.main(["--format", "vqav2", "--questions", q, "--annotations", a, "--output", str(out),
                     "--group-by-image", "--image-template", "coco/train2017/{image_id:012d}.jpg"]) == 0
    records, report = read_output(out)
    assert report["records_kept"] == 3 and report["records_written"] == 2
    first = records[0]
    assert first["image"] == "coco/train2017/000000000042.jpg" and first["id"] == "000000000042"
    assert [t["value"] for t in first["conversations"]] == [
        f"<image>\nWhat color is the bus?\n{SHORT}", "red", f"How many wheels?\n{SHORT}", "4"]


def test_image_template_with_unknown_field_is_an_error(tmp_path, capsys):
    q, a = vqav2_files(tmp_path)
    code = vqa.main(["--format", "vqav2", "--questions", q, "--annotations", a, "--output", str(tmp_path / "o.jsonl"),
                     "--image-template", "{imageId}.jpg"])
    assert code == 2 and "image_id" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_image_with_image_folder_and_output_passes_the_validator(tmp_path):
    q, a = vqav2_files(tmp_path)
    images = tmp_path / "coco"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "COCO_train2014_000000000042.jpg")  # image 7 is missing
    out = tmp_path / "o.jsonl"
    assert vqa.main(["--format", "vqav2", "--questions", q, "--annotations", a, "--output", str(out),
                     "--image-folder", str(images), "--strict"]) == 1
    records, report = read_output(out)
    assert report["dropped_by_reason"]["missing_image"] == 1 and len(records) == 2
    assert llava_instruct.main(["--input", str(out), "--image-folder", str(images), "--output",
                                str(tmp_path / "clean.jsonl"), "--workers", "0", "--strict"]) == 0


def test_most_common_answer_ties_are_stable():
    assert vqa.most_common_answer(["b", "a", "a", "b", "c"]) == "b"
    assert vqa.most_common_answer(["a", "b", "b", "a", "c"]) == "a"
    assert vqa.most_common_answer([" x ", "x", "y", None, ""]) == "x"
    assert vqa.most_common_answer(["", "  ", None]) is None


# -- GQA, TextVQA, VizWiz ---------------------------------------------------------------------------------------------

def test_gqa(tmp_path):
    doc = {
        "201307251": {"imageId": "2386621", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is."},
        "201640614": {"imageId": "2386621", "question": "What is on the table?", "answer": "cup"},
        "20000001": {"imageId": "n1", "question": "No answer here?"},
        "20000002": ["not", "an", "object"],
    }
    out = tmp_path / "gqa.jsonl"
    assert vqa.main(["--format", "gqa", "--questions", write_json(tmp_path / "gqa.json", doc), "--output", str(out)]) == 0
    records, report = read_output(out)
    assert records[0] == {"id": "201307251", "image": "2386621.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nIs the sky blue?\n{SHORT}"}, {"from": "gpt", "value": "yes"}]}
    assert len(records) == 2
    assert by_reason(report) == {"bad_answer": ("20000001", 3, None), "not_an_object": ("20000002", 4, None)}


def test_textvqa(tmp_path):
    doc = {"dataset_type": "train", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question": "what brand is this?", "image_id": "0054c91397f2fe05", "question_id": 34602, "set_name": "train",
         "answers": ["nokia"] * 3 + ["Nokia"] * 7, "image_classes": ["Mobile phone"]},
        {"question": "what time is it?", "image_id": "00685bc495504d61", "question_id": 34603, "set_name": "train"},
    ]}
    out = tmp_path / "textvqa.jsonl"
    assert vqa.main(["--format", "textvqa", "--questions", write_json(tmp_path / "t.json", doc), "--output", str(out),
                     "--image-template", "textvqa/{set_name}_images/{image_id}.jpg"]) == 0
    records, report = read_output(out)
    assert records == [{"id": "34602", "image": "textvqa/train_images/0054c91397f2fe05.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nwhat brand is this?\n{SHORT}"}, {"from": "gpt", "value": "Nokia"}]}]
    assert by_reason(report) == {"no_answer": ("34603", 2, None)}


def test_vizwiz(tmp_path):
    def answers(*words):
        return [{"answer": w, "answer_confidence": "yes"} for w in words]

    doc = [
        {"image": "VizWiz_train_00000000.jpg", "question": "What's the name of this product?",
         "answers": answers(*["basil leaves"] * 6, *["unanswerable"] * 4), "answer_type": "other", "answerable": 1},
        {"image": "VizWiz_train_00000001.jpg", "question": "What is this?",
         "answers": answers(*["unanswerable"] * 10), "answer_type": "unanswerable", "answerable": 0},
        {"image": "VizWiz_train_00000002.jpg", "question": "   ", "answers": answers("x")},
    ]
    out = tmp_path / "vizwiz.jsonl"
    assert vqa.main(["--format", "vizwiz", "--questions", write_json(tmp_path / "v.json", doc), "--output", str(out)]) == 0
    records, report = read_output(out)
    prompt = ("<image>\nWhat's the name of this product?\nWhen the provided information is insufficient, "
              f"respond with 'Unanswerable'.\n{SHORT}")
    assert records[0] == {"id": "VizWiz_train_00000000", "image": "VizWiz_train_00000000.jpg", "conversations": [
        {"from": "human", "value": prompt}, {"from": "gpt", "value": "basil leaves"}]}
    assert records[1]["conversations"][1]["value"] == "unanswerable"
    assert by_reason(report) == {"bad_question": ("VizWiz_train_00000002.jpg", 3, None)}


# -- ScienceQA ----------------------------------------------------------------------------------------------------

SQA = {
    "1": {"question": "Which figure of speech is used in this text?", "choices": ["simile", "metaphor"], "answer": 0,
          "hint": "Sing the song as quietly as a mouse.", "image": None, "split": "train", "subject": "language science"},
    "2": {"question": "Which animal's feet are also adapted for digging?", "choices": ["mole", "horse", "fish"],
          "answer": 2, "hint": "", "image": "image.png", "split": "train"},
    "3": {"question": "Which is a solid?", "choices": ["ice", "steam"], "answer": 0, "hint": "", "image": "image.png",
          "split": "test"},
    "4": {"question": "Broken answer index?", "choices": ["a", "b"], "answer": 5, "hint": "", "image": None, "split": "train"},
    "5": {"question": "One choice?", "choices": ["a"], "answer": 0, "hint": "", "image": None, "split": "train"},
}
LETTER = "Answer with the option's letter from the given choices directly."


def test_scienceqa(tmp_path):
    out = tmp_path / "sqa.jsonl"
    assert vqa.main(["--format", "scienceqa", "--questions", write_json(tmp_path / "problems.json", SQA),
                     "--split", "train", "--output", str(out)]) == 0
    records, report = read_output(out)
    assert records[0] == {"id": "1", "conversations": [
        {"from": "human", "value": "Context: Sing the song as quietly as a mouse.\n"
                                   f"Which figure of speech is used in this text?\nA. simile\nB. metaphor\n{LETTER}"},
        {"from": "gpt", "value": "A"}]}
    assert records[1] == {"id": "2", "image": "train/2/image.png", "conversations": [
        {"from": "human", "value": f"<image>\nWhich animal's feet are also adapted for digging?\nA. mole\nB. horse\n"
                                   f"C. fish\n{LETTER}"},
        {"from": "gpt", "value": "C"}]}
    assert len(records) == 2 and report["not_selected"] == {"other_split": 1}
    assert by_reason(report) == {"bad_answer": ("4", 4, None), "bad_choices": ("5", 5, None)}


def test_scienceqa_images_only(tmp_path):
    out = tmp_path / "sqa_img.jsonl"
    assert vqa.main(["--format", "scienceqa", "--questions", write_json(tmp_path / "problems.json", SQA),
                     "--split", "all", "--images-only", "--output", str(out)]) == 0
    records, report = read_output(out)
    assert [r["id"] for r in records] == ["2", "3"] and report["not_selected"] == {"no_image": 3}


def test_bad_arguments(tmp_path):
    q = write_json(tmp_path / "q.json", {"questions": []})
    with pytest.raises(SystemExit):  # vqav2 needs its annotations
        vqa.main(["--format", "vqav2", "--questions", q, "--output", str(tmp_path / "o.jsonl")])
    with pytest.raises(SystemExit):  # scienceqa needs --split
        vqa.main(["--format", "scienceqa", "--questions", q, "--output", str(tmp_path / "o.jsonl")])
    as_list = write_json(tmp_path / "list.json", [{"question": "q"}])
    assert vqa.main(["--format", "gqa", "--questions", as_list, "--output", str(tmp_path / "o.jsonl")]) == 2
    assert vqa.main(["--format", "textvqa", "--questions", q, "--output", str(tmp_path / "o.jsonl")]) == 2


# -- Commonsense170K and MetaMathQA ---------------------------------------------------------------------------------

def test_commonsense170k(tmp_path):
    rows = [
        {"instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
                        "Answer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"},
        {"instruction": "Classify the sentiment.", "input": "I loved it.", "output": "positive", "answer": "positive"},
        {"instruction": "No output here", "input": ""},
        {"instruction": "Bad input", "input": ["x"], "output": "y"},
    ]
    out = tmp_path / "cs.jsonl"
    assert commonsense.main(["--input", write_json(tmp_path / "commonsense_170k.json", rows), "--output", str(out)]) == 0
    records, report = read_output(out)
    assert records[0] == {"id": "commonsense170k-1", "conversations": [
        {"from": "human", "value": rows[0]["instruction"]}, {"from": "gpt", "value": "the correct answer is true"}]}
    assert by_reason(report) == {"bad_output": (None, 3, None), "bad_input": (None, 4, None)}
    # The alpaca template renders LLM-Adapters' (Alpaca's) prompts exactly, with and without an input.
    alpaca = get_template("alpaca")
    no_input = "".join(text for text, _ in render_pieces(alpaca, records[0]["conversations"], "</s>"))
    assert no_input == ("Below is an instruction that describes a task. Write a response that appropriately "
                        f"completes the request.\n\n### Instruction:\n{rows[0]['instruction']}\n\n### Response:\n"
                        "the correct answer is true</s>")
    with_input = "".join(text for text, _ in render_pieces(alpaca, records[1]["conversations"], "</s>"))
    assert with_input == ("Below is an instruction that describes a task, paired with an input that provides further "
                          "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                          "Classify the sentiment.\n\n### Input:\nI loved it.\n\n### Response:\npositive</s>")
    # and the output is valid training data
    assert llava_instruct.main(["--input", str(out), "--output", str(tmp_path / "clean.jsonl"), "--workers", "0",
                                "--template", "alpaca", "--strict"]) == 0


def test_metamathqa_jsonl_with_a_broken_line(tmp_path, tiny_tokenizer):
    lines = [
        json.dumps({"query": "What is 6 times 7?", "response": "6 * 7 = 42. The answer is: 42", "type": "GSM_Rephrased"}),
        "{not json",
        json.dumps({"query": "Empty response?", "response": "  ", "type": "MATH_FOBAR"}),
        json.dumps({"query": "What is 1+1?", "response": "The answer is: 2", "type": "GSM_AnsAug"}),
    ]
    src = tmp_path / "MetaMathQA.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "mm.jsonl"
    assert metamath.main(["--input", str(src), "--output", str(out), "--strict"]) == 1
    records, report = read_output(out)
    assert [r["id"] for r in records] == ["metamathqa-1", "metamathqa-4"]
    assert records[0]["conversations"] == [{"from": "human", "value": "What is 6 times 7?"},
                                           {"from": "gpt", "value": "6 * 7 = 42. The answer is: 42"}]
    assert by_reason(report) == {"malformed_json": (None, None, 2), "bad_response": (None, None, 3)}
    assert report["kept_by_type"] == {"GSM_AnsAug": 1, "GSM_Rephrased": 1}
    enc = encode_conversation(tiny_tokenizer, "alpaca", records[0]["conversations"])
    assert tiny_tokenizer.decode([t for t in enc.labels if t >= 0]) == "6 * 7 = 42. The answer is: 42</s>"


def test_hub_name_goes_through_datasets(tmp_path, monkeypatch):
    """The hub path cannot reach the hub here; check that rows from datasets.load_dataset flow through."""
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"query": "q1", "response": "r1", "type": "t"}, {"query": "", "response": "r2", "type": "t"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "hub.jsonl"
    assert metamath.main(["--input", "meta-math/MetaMathQA", "--output", str(out)]) == 0
    records, report = read_output(out)
    assert calls == [("meta-math/MetaMathQA", "train")] and len(records) == 1
    assert by_reason(report) == {"bad_query": (None, 2, None)}


def test_unknown_input_is_an_error(tmp_path, capsys):
    assert commonsense.main(["--input", str(tmp_path / "missing.json"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


# -- mistakes that used to pass quietly or crash (2026-11-30 audit) --------------------------------------------------

def test_unhashable_question_ids_are_counted_not_a_crash(tmp_path):
    q, a = vqav2_files(tmp_path)
    doc = json.loads(Path(q).read_text())
    doc["questions"][0]["question_id"] = [42000]  # a list: cannot index the annotations by it
    bad_anns = json.loads(Path(a).read_text())
    bad_anns["annotations"].append({"question_id": {"x": 1}, "answers": []})
    out = tmp_path / "o.jsonl"
    assert vqa.main(["--format", "vqav2", "--questions", write_json(tmp_path / "q2.json", doc),
                     "--annotations", write_json(tmp_path / "a2.json", bad_anns), "--output", str(out)]) == 0
    records, report = read_output(out)
    assert by_reason(report)["bad_question_id"] == ("[42000]", 1, None) and [r["id"] for r in records] == ["42001", "7000"]


def test_scienceqa_split_that_no_problem_has_is_an_error_naming_the_splits(tmp_path, capsys):
    args = ["--format", "scienceqa", "--questions", write_json(tmp_path / "problems.json", SQA)]
    assert vqa.main([*args, "--split", "training", "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "no problem has split 'training'; its splits: " in err and "train (" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_output_must_be_named_json_or_jsonl(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        commonsense.main(["--input", str(tmp_path / "in.json"), "--output", str(tmp_path / "o.txt")])
    assert info.value.code == 2 and ".jsonl file" in capsys.readouterr().err


def test_missing_local_file_with_a_slash_is_not_sent_to_the_hub(tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the hub"))
    monkeypatch.chdir(tmp_path)
    assert commonsense.main(["--input", "data/cs.json", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "data/cs.json: no such file" in capsys.readouterr().err
