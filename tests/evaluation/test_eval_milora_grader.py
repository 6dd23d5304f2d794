"""`--protocol milora`: the grader of the MiLoRA paper's GSM8K and MATH tables (sufenlp/MiLoRA inference/grader.py,
util.is_equiv, MATH_inference.py, gsm8k_inference.py), each rule pinned with a minimal case read off its code;
and gold solutions without a braced \\boxed{...}, which the references score wrong instead of stopping."""

import json

import pytest

from milora_vlm.evaluation.gsm8k import score_gsm8k
from milora_vlm.evaluation.inputs import EvalInputError
from milora_vlm.evaluation.math_equivalence import score_math, strip_string
from milora_vlm.evaluation.milora_grader import gsm8k_equal, is_equiv, math_equal
from tests.helpers import load_script
from tests.helpers.files import write_jsonl as _jsonl


def _answers(path, texts):
    return _jsonl(path, [{"question_id": i, "prompt": "q", "text": t, "model_id": "m"} for i, t in enumerate(texts)])


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        # 1. numbers: relative 1e-4 against gold / 100, gold, gold * 100 ("include_percentage")
        ("50", "0.5", True),
        ("0.5", "50", True),
        ("1.0001", "1", True),
        ("1.0002", "1", False),
        ("1,000", "1000", True),
        ("5000", "5", False),  # x 1000 is not among them
        # empty prediction
        ("", "0", False),
        # 2. brackets: outer ()[] stripped when the gold does not open with the other kind; {}() deleted
        ("(1,2)", "1,2", True),
        ("x^{2}", "x^2", True),
        ("(x+1)(x+2)", "x+1x+2", True),  # deleting parentheses equates different expressions: kept
        ("[1,2]", "(1,2)", False),
        # element-wise, each part by math_equal: 0.5 is 50 / 100
        ("(0.5,2)", "(50,2)", True),
        ("[0.5,3]", "[50,2]", False),
        # 3. sympy: parse_expr, simplify(a - b) == 0, else N() within relative 1e-3
        ("2*x+1", "1+2*x", True),
        ("sqrt(2)", "1.4142", True),
        ("sqrt(2)", "1.41", False),
        # LaTeX is not parsed (parse_latex needs antlr4, absent from the reference's environment)
        ("\\frac{1}{4}", "0.25", False),
    ],
)
def test_math_equal_rules(prediction, reference, expected):
    assert math_equal(prediction, reference, None) is expected


def test_strip_string_slash_rule_of_the_milora_copy():
    assert strip_string("3/4", slash_value_error=True) == "\\frac{3}{4}"
    assert strip_string("\\pi/2") == "\\pi/2"  # Hendrycks' release: left as it is
    with pytest.raises(ValueError):
        strip_string("\\pi/2", slash_value_error=True)  # MetaMath's and MiLoRA's copies: int() raises


def test_is_equiv_exception_path_is_counted_not_copied():
    # util.is_equiv: strip_string raises on "\pi/2", and the reference returns math_equal(pred, pred): right,
    # whatever the gold. Here the prediction is compared with the gold, and the reference verdict is returned.
    assert is_equiv("\\pi/2", "7", None) == (False, True)
    assert is_equiv("\\pi/2", "\\pi/2", None) == (True, None)  # same verdict: nothing to count
    assert is_equiv("\\frac12", "0.5", None) == (True, None)  # strip_string: both \frac{1}{2}
    assert is_equiv("7", None, None) == (False, None)
    # strip_string turns a bare "0.5" into \frac{1}{2} before the numeric rule sees it: 50 is not 0.5 * 100 here
    assert is_equiv("50", "0.5", None) == (False, None) and is_equiv("40", "0.4", None) == (True, None)  # no gold (no braced \boxed): wrong


def test_gsm8k_equal():
    # gsm8k_inference.py: float(pred) == float(gold) or math_equal(pred, gold)
    assert gsm8k_equal(18, 18.0)
    assert gsm8k_equal(1800, 18.0) and gsm8k_equal(18, 1800.0)
    assert gsm8k_equal(100009, 100000.0)  # relative 1e-4
    assert not gsm8k_equal(19, 18.0)


def test_gsm8k_protocols_side_by_side(tmp_path):
    questions = _jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "#### 18"}, {"question": "q", "answer": "#### 5"}])
    answers = _answers(tmp_path / "a.jsonl", ["The answer is: 1800", "The answer is: 5"])
    strict = score_gsm8k(answers, questions).to_dict()
    milora = score_gsm8k(answers, questions, protocol="milora").to_dict()
    assert strict["score"] == 50.0 and strict["metrics"]["protocol"] == "strict"
    assert milora["score"] == 100.0 and milora["metrics"]["protocol"] == "milora"
    assert milora["protocol"].startswith("milora:")
    with pytest.raises(EvalInputError, match="--protocol must be one of"):
        score_gsm8k(answers, questions, protocol="paper")


def test_math_protocols_side_by_side(tmp_path):
    questions = _jsonl(tmp_path / "MATH_test.jsonl", [
        {"instruction": "p0", "output": "$\\boxed{\\frac{1}{4}}$"},
        {"instruction": "p1", "output": "$\\boxed{0.4}$"},
        {"instruction": "p2", "output": "$\\boxed{7}$"},
        {"instruction": "p3", "output": "$\\boxed{(1,2)}$"},
    ])
    answers = _answers(tmp_path / "a.jsonl", ["The answer is: 0.25", "The answer is: 40", "The answer is: \\pi/2",
                                             "The answer is: [1,2]"])
    strict = score_math(answers, questions, time_limit=0).to_dict()
    milora = score_math(answers, questions, time_limit=0, protocol="milora").to_dict()
    # strict: 0.25 = 1/4 numerically; 40 is not 0.4; \pi/2 is not 7; [1,2] is not (1,2)
    assert strict["score"] == 25.0 and strict["metrics"]["protocol"] == "strict"
    # milora: 0.25 vs \frac{1}{4} is not shown equal; 50 = 0.5 * 100; \pi/2 raises: counted, and the
    # reference's figure (it scores that item right) is given next to ours; [1,2] vs (1,2): different
    assert milora["score"] == 25.0 and milora["metrics"]["protocol"] == "milora"
    assert milora["metrics"]["decided_by"] == {"different": 2, "equal": 1, "exception_path": 1}
    assert milora["metrics"]["accuracy_with_reference_exception_path"] == 50.0
    assert any("the reference grader scores them RIGHT" in w for w in milora["warnings"])


@pytest.mark.parametrize("protocol", ["strict", "milora"])
def test_gold_without_braced_boxed_is_scored_wrong_and_named(tmp_path, protocol):
    # MetaMath's / MiLoRA's remove_boxed(last_boxed_only_string(...)) gives None for both; is_equiv(pred, None)
    # is False: the item is wrong and the run goes on.
    questions = _jsonl(tmp_path / "MATH_test.jsonl", [
        {"instruction": "p0", "output": "so it is $\\boxed 7$"},
        {"instruction": "p1", "output": "so it is $\\fbox{3}$"},
        {"instruction": "p2", "output": "$\\boxed{2}$"},
    ])
    answers = _answers(tmp_path / "a.jsonl", ["The answer is: 7", "The answer is: 3", "The answer is: 2"])
    r = score_math(answers, questions, time_limit=0, protocol=protocol).to_dict()
    assert r["score"] == pytest.approx(100 / 3)
    assert r["metrics"]["decided_by"]["gold_without_boxed"] == 2
    assert any("2 gold solutions have no braced" in w and "MATH_test.jsonl:1" in w and "MATH_test.jsonl:2" in w
               for w in r["warnings"])


def test_score_cli_protocol_flag(tmp_path, capsys):
    cli = load_script("eval/score.py", "eval_score_cli_p")
    questions = _jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "#### 18"}])
    answers = _answers(tmp_path / "a.jsonl", ["The answer is: 1800"])
    assert cli.main(["--task", "gsm8k", "--predictions", answers, "--questions", questions, "--protocol", "milora"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["score"] == 100.0 and out["metrics"]["protocol"] == "milora"
    assert cli.main(["--task", "exact", "--predictions", answers, "--questions", questions, "--protocol", "milora"]) == 2
    assert "does not use --protocol" in capsys.readouterr().err
