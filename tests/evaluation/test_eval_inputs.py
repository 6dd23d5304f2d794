"""Malformed scoring inputs give errors naming file, line and field (or counted warnings), never a quiet score;
and eval/score.py's command line."""

import json
import os
import subprocess
import sys

import pytest

from milora_vlm.evaluation.exact import score_exact
from milora_vlm.evaluation.inputs import EvalInputError, load_predictions
from tests.helpers import REPO, load_script
from tests.helpers.files import write_jsonl as _jsonl


score_cli = load_script("eval/score.py", "eval_score_cli")


@pytest.fixture
def questions(tmp_path):
    return _jsonl(tmp_path / "q.jsonl", [{"question_id": i, "text": "?", "answer": "red"} for i in range(3)])


def test_malformed_jsonl_line_is_named(tmp_path, questions):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": 0, "text": "red"}\n{"question_id": 1, "text": \n{"question_id": 2, "text": "red"}\n')
    with pytest.raises(EvalInputError, match=r"a\.jsonl:2: malformed JSON"):
        score_exact(str(path), questions)


def test_cut_off_last_line_hints_at_a_killed_run(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": 0, "text": "red"}\n{"question_id": 1, "te')
    with pytest.raises(EvalInputError, match=r":2: .*killed"):
        load_predictions(str(path))


def test_malformed_json_document_is_named(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"question_id": 0, "answer": "red"},\n {"question_id": 1 "answer": "x"}]')
    with pytest.raises(EvalInputError, match=r"p\.json: malformed JSON: .* at line 2 column"):
        load_predictions(str(path))


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"question_id": 0, "text": "a"}, {"question_id": 0, "text": "b"}], r":2: duplicate prediction for '0' \(first at line 1\)"),
        ([{"text": "a"}], r":1: missing id field"),
        ([{"question_id": 0, "prompt": "?"}], r":1: missing prediction field"),
        ([{"question_id": 0, "text": 3}], r":1: field 'text' is a int"),
        ([{"question_id": 0, "text": "a"}, {"question_id": 1, "answer": "b"}], r":2: mixes prediction fields"),
        ([{"question_id": [0], "text": "a"}], r":1: id field 'question_id' is a list"),
        (["not an object"], r":1: record is a str"),
    ],
)
def test_bad_prediction_records(tmp_path, rows, message):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvalInputError, match=message):
        load_predictions(str(path))


def test_unknown_ids_fail_unless_allowed_then_are_counted(tmp_path, questions):
    preds = _jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "red"}, {"question_id": 7, "text": "red"}])
    with pytest.raises(EvalInputError, match=r"1 prediction\(s\) have question ids not in the gold file, e.g. '7' \(line 2\)"):
        score_exact(preds, questions)
    r = score_exact(preds, questions, allow_unknown=True).to_dict()
    assert r["counts"] == {"gold": 3, "predicted": 1, "missing": 2, "unparsable": 0, "unknown_ignored": 1}
    assert r["score"] == pytest.approx(100 / 3)


def test_bad_gold_records(tmp_path):
    preds = _jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "red"}])
    with pytest.raises(EvalInputError, match=r"q\.jsonl:2: missing field 'answer'"):
        score_exact(preds, _jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "answer": "red"}, {"question_id": 1}]))
    with pytest.raises(EvalInputError, match=r"q2\.jsonl:2: duplicate question_id '0'"):
        score_exact(preds, _jsonl(tmp_path / "q2.jsonl", [{"question_id": 0, "answer": "a"}, {"question_id": 0, "answer": "b"}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalInputError, match="no questions to score"):
        score_exact(preds, str(tmp_path / "empty.jsonl"))
    with pytest.raises(EvalInputError, match="no such file"):
        score_exact(preds, str(tmp_path / "nope.jsonl"))


def test_byte_order_mark_is_accepted(tmp_path, questions):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"question_id": 0, "text": "red"}\n')
    assert score_exact(str(path), questions, allow_unknown=False).to_dict()["counts"]["predicted"] == 1


NOT_UTF8 = b'{"question_id": 1, "text": "caf\xe9"}\n'  # Latin-1 'é': not UTF-8


@pytest.mark.parametrize("name", ["a.jsonl", "a.json"])
def test_non_utf8_predictions_name_file_line_and_column(tmp_path, questions, capsys, name):
    path = tmp_path / name
    path.write_bytes(b'{"question_id": 0, "text": "red"}\n' + NOT_UTF8)
    with pytest.raises(EvalInputError, match=rf"{name}:2: not UTF-8 \(byte 0xe9 at column 32\)"):
        score_exact(str(path), questions)
    assert score_cli.main(["--task", "exact", "--predictions", str(path), "--questions", questions]) == 2
    assert f"{name}:2: not UTF-8" in capsys.readouterr().err


def test_non_utf8_gold_file_is_named(tmp_path):
    gold = tmp_path / "gold.json"
    gold.write_bytes(b'[\n{"question_id": 0, "answer": "red"},\n' + NOT_UTF8.replace(b"text", b"answer") + b"]")
    preds = _jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "red"}])
    with pytest.raises(EvalInputError, match=r"gold.json:3: not UTF-8"):
        score_exact(preds, str(gold))


def test_score_cli_prints_and_writes_json(tmp_path, questions, capsys):
    preds = _jsonl(tmp_path / "a.jsonl", [{"question_id": i, "prompt": "?", "text": "Red.", "model_id": "m"} for i in range(2)])
    out = tmp_path / "scores" / "exact.json"
    assert score_cli.main(["--task", "exact", "--predictions", preds, "--questions", questions, "--output", str(out)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed == json.loads(out.read_text())
    assert printed["score"] == pytest.approx(200 / 3)
    assert "warning: 1 of 3 questions have no prediction" in captured.err


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "task 'exact' needs --questions"),
        (["--questions", "Q", "--annotations", "x.json"], "task 'exact' does not use --annotations"),
    ],
)
def test_score_cli_rejects_missing_and_unused_inputs(tmp_path, questions, capsys, extra, message):
    extra = [questions if e == "Q" else e for e in extra]
    assert score_cli.main(["--task", "exact", "--predictions", "p.jsonl", *extra]) == 2
    assert message in capsys.readouterr().err


def test_score_cli_runs_as_a_script(tmp_path, questions):
    preds = _jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": "red"} for i in range(3)])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "eval", "score.py"), "--task", "exact",
                           "--predictions", preds, "--questions", questions], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["score"] == 100.0


# ---- hostile prediction and gold files (2026-11-30 audit) ------------------------------------------------------------

def test_hostile_prediction_lines_are_errors_naming_the_line(tmp_path):
    cases = {"deep": "[" * 100_000 + "]" * 100_000, "dup": '{"question_id": 0, "question_id": 1, "text": "red"}',
             "surrogate": '{"question_id": 0, "text": "\\udc80"}'}
    messages = {"deep": "nested too deeply", "dup": "duplicate key 'question_id'", "surrogate": "lone surrogate"}
    for name, line in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text('{"question_id": 5, "text": "red"}\n' + line + "\n")
        with pytest.raises(EvalInputError, match=f"{name}\\.jsonl:2: malformed JSON: .*{messages[name]}"):
            load_predictions(str(path))


def test_unescaped_line_separator_inside_an_answer_is_not_a_line_break(tmp_path):
    path = tmp_path / "a.jsonl"  # json.dumps(ensure_ascii=False) writes U+2028 / U+0085 as they are
    path.write_text(json.dumps({"question_id": 0, "text": "red\u2028green\x85"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert load_predictions(str(path)).texts == {"0": "red\u2028green\x85"}


def test_empty_prediction_file_is_an_error_not_a_zero_score(tmp_path, questions):
    empty = tmp_path / "a.jsonl"
    empty.write_text("\n")
    with pytest.raises(EvalInputError, match=r"a\.jsonl: no predictions in the file"):
        score_exact(str(empty), questions)


def test_runaway_numbers_are_unparsable_not_a_crash(tmp_path):
    from milora_vlm.evaluation.gsm8k import extract_gsm8k_number, score_gsm8k
    from milora_vlm.evaluation.math_equivalence import to_number

    mark = "The answer is: "
    for text in (mark + "1" * 400 + "/3", mark + "1/" + "1" * 5000, mark + "9" * 5000, mark + "1" * 400 + "/0"):
        assert extract_gsm8k_number(text) is None
    assert extract_gsm8k_number(mark + "3/4") == 1 and extract_gsm8k_number(mark + "1,234") == 1234  # (the reference's)
    for text in ("1" * 400, "\\frac{" + "1" * 400 + "}{3}", "\\frac{1}{" + "1" * 5000 + "}", "1" * 5000):
        assert to_number(text) is None
    assert to_number("\\frac{3}{4}") == 0.75
    gold = _jsonl(tmp_path / "g.jsonl", [{"question_id": 0, "answer": "#### nan"}])
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": 0, "text": "The answer is: 1"}])
    with pytest.raises(EvalInputError, match=r"g\.jsonl:1: field 'answer'"):
        score_gsm8k(preds, gold)


def test_scienceqa_split_that_no_problem_has_names_the_splits(tmp_path):
    from milora_vlm.evaluation.scienceqa import score_scienceqa

    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps({"1": {"split": "test", "choices": ["a", "b"], "answer": 0}}))
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": "1", "text": "A"}])
    with pytest.raises(EvalInputError, match="no problem has split 'tset'; its splits: test"):
        score_scienceqa(preds, str(problems), split="tset")
