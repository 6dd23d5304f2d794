"""GSM8K and MATH scoring: MetaMath's answer extraction, Hendrycks' normalisation, numeric / symbolic equality."""


import pytest

from milora_vlm.evaluation.gsm8k import extract_gsm8k_number, gsm8k_gold, score_gsm8k
from milora_vlm.evaluation.math_equivalence import (
    TimeLimitedWorker,
    extract_math_answer,
    last_boxed_only_string,
    math_equal,
    remove_boxed,
    score_math,
    strip_string,
)
from tests.helpers.files import write_jsonl as _jsonl


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("3 + 15 = 18. The answer is: 18", 18),
        ("The answer is: 1,234", 1234),
        ("The answer is: 1,234,567", 1234),  # one comma only: a kept quirk
        ("The answer is: 3/4", 1),  # fractions are rounded to an integer
        ("The answer is: 5/0", 5),
        ("The answer is: 5/00", None),  # MetaMath's "== '0'" test misses it and the division raises there
        ("The answer is: 2.5", 2),  # Python's round(): half to even
        ("The answer is: 3.5", 4),
        ("The answer is: -7 apples", -7),
        ("The answer is: $18.00", 18),
        ("The answer is: 3. Wait. The answer is: 4", 4),  # the last mark counts
        ("The answer is 18", None),  # MetaMath needs "The answer is: "
        ("The answer is: x", None),
        ("", None),
    ],
)
def test_extract_gsm8k_number(completion, expected):
    assert extract_gsm8k_number(completion) == expected


def test_gsm8k_gold_and_score(tmp_path):
    assert gsm8k_gold("Natalia sold 48/2 = 24 clips.\n#### 1,000") == 1000
    questions = _jsonl(tmp_path / "test.jsonl", [{"question": "q0", "answer": "... #### 72"},
                                                 {"question": "q1", "answer": "... #### 10"},
                                                 {"question": "q2", "answer": "... #### 5"}])
    answers = _jsonl(tmp_path / "a.jsonl", [
        {"question_id": 0, "prompt": "q0", "text": "48 + 24 = 72. The answer is: 72", "model_id": "m"},
        {"question_id": 1, "prompt": "q1", "text": "I think it is 10", "model_id": "m"},  # no mark: unparsable
    ])
    r = score_gsm8k(answers, questions).to_dict()
    assert r["score"] == pytest.approx(100 / 3)
    assert r["counts"]["unparsable"] == 1 and r["counts"]["missing"] == 1


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("x = 5", "5"),
        ("10\\%", "10"),
        ("90^\\circ", "90"),
        ("\\$5", "5"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("3 \\text{ cm}", "3"),
        ("a/b", "a/b"),  # only integer a/b becomes a fraction
    ],
)
def test_strip_string(raw, expected):
    assert strip_string(raw) == expected


@pytest.mark.parametrize("raw,error", [("2\\sqrt", IndexError), ("x\\frac", IndexError),
                                       ("1 \\text{ a} \\text{ b}", AssertionError)])
def test_strip_string_raises_like_the_reference(raw, error):
    with pytest.raises(error):
        strip_string(raw)


def test_boxed_and_extraction():
    solution = "First \\boxed{2}, then $\\boxed{\\frac{1}{{2}}}$."
    assert last_boxed_only_string(solution) == "\\boxed{\\frac{1}{{2}}}"
    assert remove_boxed(last_boxed_only_string(solution)) == "\\frac{1}{{2}}"
    assert remove_boxed(last_boxed_only_string("\\boxed{unclosed")) is None
    assert extract_math_answer("So $\\boxed{5}$. The answer is: 5") == "5"
    assert extract_math_answer("The answer is: \\frac{1}{2}.\nDone.") == "\\frac{1}{2}"
    assert extract_math_answer("The answer is: 7.") == "7"
    assert extract_math_answer("no mark") is None


def test_math_equal_string_and_numeric_without_sympy():
    assert math_equal("0.5", "\\frac{1}{2}", None) == (True, "string")
    assert math_equal("1,000", "1000", None) == (True, "numeric")
    assert math_equal("\\frac{3}{4}", "0.75", None) == (True, "numeric")
    assert math_equal("3", "4", None) == (False, "different")
    # An exception while normalising is WRONG, even when the raw strings agree (the reference says right).
    assert math_equal("2\\sqrt", "2\\sqrt", None) == (False, "normalisation_error")


def test_math_equal_symbolic_and_timeout():
    worker = TimeLimitedWorker(60)
    try:
        assert math_equal("2\\sqrt{2}", "\\sqrt{8}", worker) == (True, "symbolic")
        assert math_equal("x+1", "1+x", worker) == (True, "symbolic")
        assert math_equal("\\frac{\\pi}{2}", "\\pi/2", worker) == (True, "symbolic")
        assert math_equal("\\sqrt{3}", "\\sqrt{2}", worker) == (False, "different")
    finally:
        worker.close()
    quick = TimeLimitedWorker(0.001)  # no worker can even start in time: the comparison is abandoned
    try:
        assert math_equal("2\\sqrt{2}", "\\sqrt{8}", quick) == (False, "timeout")
    finally:
        quick.close()


def test_score_math_gold_from_solutions(tmp_path):
    questions = _jsonl(tmp_path / "MATH_test.jsonl", [
        {"instruction": "p0", "output": "... so $\\boxed{\\frac{1}{2}}$", "type": "Algebra"},
        {"instruction": "p1", "output": "... $\\boxed{10}$", "type": "Geometry"},
        {"instruction": "p2", "output": "... $\\boxed{3}$", "type": "Geometry"},
    ])
    answers = _jsonl(tmp_path / "a.jsonl", [
        {"question_id": 0, "prompt": "p0", "text": "Half. The answer is: 0.5", "model_id": "m"},
        {"question_id": 1, "prompt": "p1", "text": "The answer is: 10.", "model_id": "m"},
        {"question_id": 2, "prompt": "p2", "text": "The answer is: 2\\sqrt", "model_id": "m"},
    ])
    r = score_math(answers, questions, time_limit=0).to_dict()
    assert r["score"] == pytest.approx(200 / 3)
    assert r["metrics"]["per_type"] == {"Algebra": 100.0, "Geometry": 50.0}
    assert r["metrics"]["decided_by"] == {"normalisation_error": 1, "string": 2}
    assert any("strip_string" in w for w in r["warnings"])
