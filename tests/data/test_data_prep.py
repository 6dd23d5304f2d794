"""data_prep/llava_instruct.py and milora_vlm.data.validation: every bad-input kind is counted under its reason,
with its id and line, and every good record comes out byte-for-byte as it went in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from milora_vlm.data import records
from milora_vlm.data.records import RecordFileError, RecordWriter, iter_records
from milora_vlm.data.templates import encode_conversation
from milora_vlm.data.validation import CheckConfig, check_record
from tests.helpers import load_script


def load_prep(name: str):
    """Import data_prep/<name>.py as a module."""
    return load_script(f"data_prep/{name}.py", f"data_prep_{name}")


llava_instruct = load_prep("llava_instruct")


def human(v):
    return {"from": "human", "value": v}


def gpt(v):
    return {"from": "gpt", "value": v}


GOOD = [
    {"id": "g1", "image": "red.png", "conversations": [human("<image>\nWhat color is the shape?"), gpt("red")]},
    {"id": "g2", "image": "sub/blue.jpg", "conversations": [
        human("What shape is in the image?\n<image>"), gpt("circle"), human("Is it blue?"), gpt("yes")]},
    {"id": "g3", "conversations": [human("Say 42 in words, ünïcödé ✓"), gpt("forty-two")], "source": {"k": [1, 2.5]}},
    {"id": "g4", "conversations": [{"from": "system", "value": "Be brief."}, human("hi"), gpt("hello")]},
]


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (20, 12), "blue").save(tmp_path / "sub" / "blue.jpg", quality=95)
    Image.new("RGB", (64, 64), "green").save(tmp_path / "green.png")
    data = (tmp_path / "green.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixel data cut
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    return tmp_path


def dumps(rec) -> str:
    return json.dumps(rec, ensure_ascii=False)


def write_jsonl(path: Path, items) -> list[str]:
    """Write records (dicts) or raw lines (str); return the lines as written."""
    lines = [item if isinstance(item, str) else dumps(item) for item in items]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return lines


def run(folder: Path, items, *extra, name="in.jsonl", out="out.jsonl", workers=0):
    """Write `items` (a bad one among GOOD), run the validator; return (exit code, output lines, report)."""
    write_jsonl(folder / name, items)
    code = llava_instruct.main(["--input", str(folder / name), "--image-folder", str(folder),
                                "--output", str(folder / out), "--workers", str(workers), *extra])
    lines = (folder / out).read_text(encoding="utf-8").splitlines()
    report = json.loads((folder / (Path(out).stem + ".report.json")).read_text(encoding="utf-8"))
    return code, lines, report


def with_bad(bad):
    return GOOD[:2] + [bad] + GOOD[2:]  # the bad record is on line 3


DROPS = {
    "malformed_json": '{"id": "x", "conversations": [',
    "not_an_object": '["not", "a", "record"]',
    "bad_conversations": {"id": "bad", "conversations": "What color? red"},
    "bad_turn": {"id": "bad", "conversations": ["What color?", gpt("red")]},
    "bad_role": {"id": "bad", "conversations": [{"from": "robot", "value": "q"}, gpt("a")]},
    "bad_value": {"id": "bad", "conversations": [human(3), gpt("a")]},
    "empty_conversation": {"id": "bad", "conversations": [{"from": "system", "value": "You are a bot."}]},
    "roles_not_alternating": {"id": "bad", "conversations": [human("a"), gpt("b"), gpt("c"), human("d"), gpt("e")]},
    "no_answer": {"id": "bad", "conversations": [human("a question nobody answers")]},
    "empty_question": {"id": "bad", "conversations": [human("  \n"), gpt("red")]},
    "empty_answer": {"id": "bad", "conversations": [human("q"), gpt("")]},
    "bad_image_field": {"id": "bad", "image": ["red.png", "red.png"], "conversations": [human("<image>\nq"), gpt("a")]},
    "image_token_in_answer": {"id": "bad", "image": "red.png", "conversations": [human("q"), gpt("<image>\na")]},
    "image_placeholder_count": {"id": "bad", "image": "red.png", "conversations": [human("<image>\n<image>\nq"), gpt("a")]},
    "image_token_without_image": {"id": "bad", "conversations": [human("<image>\nq"), gpt("a")]},
    "missing_image": {"id": "bad", "image": "nowhere.png", "conversations": [human("<image>\nq"), gpt("a")]},
    "corrupt_image": {"id": "bad", "image": "truncated.png", "conversations": [human("<image>\nq"), gpt("a")]},
    "duplicate_record": GOOD[0],
}


@pytest.mark.parametrize("reason", sorted(DROPS))
def test_each_bad_kind_is_dropped_and_counted(folder, reason):
    code, lines, report = run(folder, with_bad(DROPS[reason]))
    assert code == 0
    assert report["dropped_by_reason"] == {reason: 1} and report["repaired_by_reason"] == {}
    assert report["records_read"] == 5 and report["records_dropped"] == 1 and report["records_written"] == 4
    (issue,) = report["issues"]
    assert issue["action"] == "dropped" and issue["reason"] == reason and issue["line"] == 3
    expected_id = None if reason in ("malformed_json", "not_an_object") else DROPS[reason]["id"]
    assert issue["id"] == expected_id and issue["detail"]
    assert lines == [dumps(r) for r in GOOD]  # the good ones, byte for byte, in order


def test_garbage_image_is_corrupt_too(folder):
    bad = {"id": "bad", "image": "garbage.jpg", "conversations": [human("<image>\nq"), gpt("a")]}
    _, lines, report = run(folder, with_bad(bad))
    assert report["dropped_by_reason"] == {"corrupt_image": 1}
    assert lines == [dumps(r) for r in GOOD]


REPAIRS = {
    "missing_id": ({"image": "red.png", "conversations": [human("<image>\nq"), gpt("a")]},
                   {"image": "red.png", "conversations": [human("<image>\nq"), gpt("a")], "id": "auto-3"}),
    "id_not_string": ({"id": 7, "conversations": [human("q"), gpt("a")]},
                      {"id": "7", "conversations": [human("q"), gpt("a")]}),
    "null_image": ({"id": "r1", "image": None, "conversations": [human("q"), gpt("a")]},
                   {"id": "r1", "conversations": [human("q"), gpt("a")]}),
    "trailing_human_turn": ({"id": "r2", "conversations": [human("q"), gpt("a"), human("and?")]},
                            {"id": "r2", "conversations": [human("q"), gpt("a")]}),
    "missing_image_token": ({"id": "r3", "image": "red.png", "conversations": [human("What is it?"), gpt("a")]},
                            {"id": "r3", "image": "red.png", "conversations": [human("<image>\nWhat is it?"), gpt("a")]}),
    "image_token_misplaced": (
        {"id": "r4", "image": "red.png", "conversations": [human("q1"), gpt("a1"), human("<image> q2"), gpt("a2")]},
        {"id": "r4", "image": "red.png", "conversations": [human("<image>\nq1"), gpt("a1"), human("q2"), gpt("a2")]}),
    "leading_assistant_turn": ({"id": "r5", "conversations": [gpt("Ask me anything."), human("q"), gpt("a")]},
                               {"id": "r5", "conversations": [human("q"), gpt("a")]}),
    "duplicate_id": ({"id": "g1", "conversations": [human("another"), gpt("record")]},
                     {"id": "g1_dup1", "conversations": [human("another"), gpt("record")]}),
}


@pytest.mark.parametrize("reason", sorted(REPAIRS))
def test_each_repairable_kind_is_repaired_and_counted(folder, reason):
    bad, fixed = REPAIRS[reason]
    code, lines, report = run(folder, with_bad(bad))
    assert code == 0
    assert report["repaired_by_reason"] == {reason: 1} and report["dropped_by_reason"] == {}
    assert report["records_written"] == 5 and report["records_repaired"] == 1 and report["records_unchanged"] == 4
    (issue,) = report["issues"]
    assert (issue["action"], issue["reason"], issue["line"]) == ("repaired", reason, 3)
    assert issue["id"] == (None if "id" not in bad else str(bad["id"]))
    assert lines == [dumps(r) for r in GOOD[:2]] + [dumps(fixed)] + [dumps(r) for r in GOOD[2:]]


def everything_bad():
    return GOOD + [v for v in DROPS.values()] + [bad for bad, _ in REPAIRS.values()]


def test_rerun_on_own_output_changes_nothing(folder):
    _, first, report1 = run(folder, everything_bad(), out="once.jsonl")
    assert report1["records_dropped"] == len(DROPS) and report1["records_repaired"] == len(REPAIRS)
    code = llava_instruct.main(["--input", str(folder / "once.jsonl"), "--image-folder", str(folder),
                                "--output", str(folder / "twice.jsonl"), "--workers", "0", "--strict"])
    report2 = json.loads((folder / "twice.report.json").read_text())
    assert code == 0 and report2["issues"] == [] and report2["records_written"] == len(first)
    assert (folder / "twice.jsonl").read_bytes() == (folder / "once.jsonl").read_bytes()


def test_strict_exit_code(folder):
    assert run(folder, GOOD, "--strict")[0] == 0
    assert run(folder, with_bad(DROPS["missing_image"]), "--strict")[0] == 1
    assert run(folder, with_bad(REPAIRS["missing_image_token"][0]), "--strict")[0] == 1
    assert run(folder, with_bad(DROPS["missing_image"]))[0] == 0


def test_json_array_in_and_out_and_workers_agree(folder):
    items = [r for r in everything_bad() if isinstance(r, dict)]
    (folder / "in.json").write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
    assert llava_instruct.main(["--input", str(folder / "in.json"), "--image-folder", str(folder),
                                "--output", str(folder / "a.json"), "--workers", "0"]) == 0
    assert llava_instruct.main(["--input", str(folder / "in.json"), "--image-folder", str(folder),
                                "--output", str(folder / "b.json"), "--workers", "2", "--chunk-size", "3"]) == 0
    assert (folder / "a.json").read_bytes() == (folder / "b.json").read_bytes()
    kept = json.loads((folder / "a.json").read_text(encoding="utf-8"))
    assert kept[:4] == GOOD
    report = json.loads((folder / "b.report.json").read_text())
    assert all("index" in i and "line" not in i for i in report["issues"])
    assert report["records_read"] == len(items)


def test_unreadable_input_exits_2(folder, capsys):
    (folder / "broken.json").write_text('[{"id": "a", "conversations": []},\n{"id": ', encoding="utf-8")
    code = llava_instruct.main(["--input", str(folder / "broken.json"), "--output", str(folder / "o.jsonl")])
    assert code == 2 and "line 2" in capsys.readouterr().err
    assert not (folder / "o.jsonl").exists() and not (folder / "o.jsonl.tmp").exists()


# -- the token-length check ------------------------------------------------------------------------------------

@pytest.fixture()
def tokenizer_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(path)
    return path


def test_too_long_measured_as_training_measures(folder, tiny_tokenizer, tokenizer_dir):
    short = {"id": "short", "image": "red.png", "conversations": [human("<image>\nWhat color?"), gpt("red")]}
    long = {"id": "long", "image": "red.png", "conversations": [human("<image>\n" + "What color? " * 5), gpt("red " * 5)]}
    n_img = 9
    lengths = {r["id"]: len(encode_conversation(tiny_tokenizer, "vicuna_v1", r["conversations"], image_token_id=4,
                                                num_image_tokens=n_img).input_ids) for r in (short, long)}
    assert lengths["short"] < lengths["long"]
    code, lines, report = run(folder, [short, long, GOOD[2]], "--tokenizer", str(tokenizer_dir),
                              "--max-length", str(lengths["long"] - 1), "--image-tokens", str(n_img))
    assert code == 0 and report["dropped_by_reason"] == {"too_long": 1}
    assert report["issues"][0]["id"] == "long" and str(lengths["long"]) in report["issues"][0]["detail"]
    assert lines == [dumps(short), dumps(GOOD[2])]
    # exactly at the limit is kept
    _, lines, report = run(folder, [short, long], "--tokenizer", str(tokenizer_dir),
                           "--max-length", str(lengths["long"]), "--image-tokens", str(n_img))
    assert report["issues"] == [] and report["token_length"]["max"] == lengths["long"]


def test_image_tokens_read_from_a_llava_dir(folder, tiny_llava_dir, tiny_tokenizer):
    from transformers import AutoConfig

    n_img = AutoConfig.from_pretrained(tiny_llava_dir).image_seq_length
    rec = {"id": "r", "image": "red.png", "conversations": [human("<image>\nWhat color?"), gpt("red")]}
    length = len(encode_conversation(tiny_tokenizer, "vicuna_v1", rec["conversations"], image_token_id=4,
                                     num_image_tokens=n_img).input_ids)
    _, _, report = run(folder, [rec], "--tokenizer", str(tiny_llava_dir), "--max-length", str(length))
    assert report["settings"]["image_tokens"] == n_img and report["issues"] == []
    _, _, report = run(folder, [rec], "--tokenizer", str(tiny_llava_dir), "--max-length", str(length - 1))
    assert report["dropped_by_reason"] == {"too_long": 1}


def test_plain_tokenizer_without_image_tokens_is_an_error(folder, tokenizer_dir):
    write_jsonl(folder / "in.jsonl", GOOD)
    code = llava_instruct.main(["--input", str(folder / "in.jsonl"), "--output", str(folder / "o.jsonl"),
                                "--tokenizer", str(tokenizer_dir), "--max-length", "100"])
    assert code == 2


# -- the library pieces ------------------------------------------------------------------------------------------

def test_check_record_never_modifies_its_input(folder):
    config = CheckConfig(image_folder=str(folder))
    for bad, fixed in REPAIRS.values():
        before = json.dumps(bad)
        verdict = check_record(bad, 3, config)
        assert json.dumps(bad) == before
        if bad.get("id") != "g1":  # duplicate ids are judged across the file, not here
            assert verdict.record == fixed


def test_json_array_streaming_across_buffer_boundaries(tmp_path, monkeypatch):
    recs = [{"id": str(i), "text": "x" * (i * 7 % 23), "n": 10**i} for i in range(30)]
    path = tmp_path / "a.json"
    path.write_text("\ufeff" + json.dumps(recs, indent=1), encoding="utf-8")  # with a byte-order mark
    monkeypatch.setattr(records._JsonArrayStream, "READ_SIZE", 5)
    assert [r for _, r, _ in iter_records(path)] == recs
    path.write_text('[\n{"id": "a"},\n{"id": "b"},\n{"id": \n]', encoding="utf-8")
    got = []
    with pytest.raises(RecordFileError, match="line 5"):
        for item in iter_records(path):
            got.append(item)
    assert [r["id"] for _, r, _ in got] == ["a", "b"]
    path.write_text('{"id": "a"}\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(RecordFileError, match="jsonl"):
        list(iter_records(path))


def test_record_writer_is_atomic(tmp_path):
    out = tmp_path / "o.jsonl"
    with pytest.raises(RuntimeError):
        with RecordWriter(out) as w:
            w.write({"id": "a"})
            raise RuntimeError("interrupted")
    assert not out.exists() and os.listdir(tmp_path) == []
    with RecordWriter(tmp_path / "o.json") as w:
        pass
    assert json.loads((tmp_path / "o.json").read_text()) == []
