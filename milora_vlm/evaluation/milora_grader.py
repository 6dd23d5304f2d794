"""The grader behind the MiLoRA paper's GSM8K and MATH tables (`--protocol milora`), decision for decision.

The MiLoRA authors' repository (sufenlp/MiLoRA) scores MATH with inference/MATH_inference.py, whose
`util.is_equiv` normalises both answers with Hendrycks' strip_string and then calls `grader.math_equal`;
GSM8K with inference/gsm8k_inference.py: the MetaMath number is right when it equals the gold or
`math_equal(prediction, gold)` holds. `math_equal` is more lenient than this project's strict default:
- numbers: right when prediction is within relative 1e-4 of gold, gold / 100 or gold * 100 (so "50" for 0.5);
- brackets: "[", "]", "(", ")" stripped from the ends and every "{", "}", "(", ")" deleted, then compared as
  strings ("(1,2)" equals "1,2"; "x^{2}" equals "x^2"); "[a, b]" vs "[c, d]" (or two tuples) element-wise;
- symbolic: sympy's parse_expr on both, simplify(a - b) == 0, else N(a) and N(b) within relative 1e-3.
  (The grader tries parse_latex first, which needs the antlr4 runtime; the repository's pinned environment
  (requirements.txt: sympy 1.12, no antlr4) lacks it, so parse_latex always raises there and is skipped here.)
- strip_string is the MiLoRA copy, whose a/b rule lets int()'s ValueError out ("\\pi/2"), and is_equiv then
  returns `math_equal(pred, pred)`: any normalisation exception scores RIGHT. That path is a typo; here it
  compares prediction and gold instead (`math_equal(pred, gold) or pred == gold`), and the items it decided
  are counted together with the figure the reference would have printed.
The reference runs sympy without a time limit; here a comparison past the time limit is wrong and counted.
Reimplemented (the repository is not a package); the tests pin each rule with a case from its code.
"""

from __future__ import annotations

from math import isclose

from .math_equivalence import TimeLimitedWorker, strip_string


def _is_digit(s) -> bool:
    try:
        float(str(s).replace(",", ""))
        return True
    except ValueError:
        return False


def symbolic_equal(a: str, b: str) -> bool:
    """grader.symbolic_equal as it runs without antlr4: parse_expr or keep the string; simplify; N."""
    from sympy import N, simplify
    from sympy.parsing.sympy_parser import parse_expr

    def parse(s):
        try:
            return parse_expr(s)
        except Exception:  # the reference's bare except: an unparsable answer stays a string
            return s

    a, b = parse(a), parse(b)
    try:
        if simplify(a - b) == 0:
            return True
    except Exception:
        pass
    try:
        if isclose(N(a), N(b), rel_tol=1e-3):
            return True
    except Exception:
        pass
    return False


def math_equal(prediction, reference, symbolic: TimeLimitedWorker | None) -> bool:
    """grader.math_equal(prediction, reference) with its defaults (percentages, is_close, no timeout).

    `symbolic` runs symbolic_equal in a worker with a time limit (TimeoutError past it); None runs it here
    without a limit, as the reference does."""
    if _is_digit(prediction) and _is_digit(reference):
        p = float(str(prediction).replace(",", ""))
        r = float(str(reference).replace(",", ""))
        return any(isclose(item, p, rel_tol=1e-4) for item in (r / 100, r, r * 100))
    if not prediction and prediction not in [0, False]:
        return False
    reference, prediction = str(reference).strip(), str(prediction).strip()
    pred_str, ref_str = prediction, reference
    if (prediction.startswith("[") and prediction.endswith("]") and not reference.startswith("(")) or (
        prediction.startswith("(") and prediction.endswith(")") and not reference.startswith("[")
    ):
        pred_str, ref_str = pred_str.strip("[]()"), ref_str.strip("[]()")
    for s in "{}()":
        ref_str, pred_str = ref_str.replace(s, ""), pred_str.replace(s, "")
    if pred_str == ref_str:
        return True
    def both_in(left: str, right: str) -> bool:
        return all(x.startswith(left) and x.endswith(right) for x in (prediction, reference))

    if both_in("[", "]") or both_in("(", ")"):
        pred_parts, ref_parts = prediction[1:-1].split(","), reference[1:-1].split(",")
        # a list, not a generator, as the reference: every part is compared (it matters for time only)
        if len(pred_parts) == len(ref_parts) and all(
            [math_equal(p, r, symbolic) for p, r in zip(pred_parts, ref_parts)]
        ):
            return True
    if symbolic is None:
        return symbolic_equal(prediction, reference)
    return symbolic(symbolic_equal, prediction, reference)


def is_equiv(prediction: str, gold: str | None, symbolic: TimeLimitedWorker | None) -> tuple[bool, bool | None]:
    """(verdict, reference verdict if it differs from ours else None) for MATH_inference.py's util.is_equiv.

    gold None (a solution without a braced \\boxed{...}) is wrong, as there. TimeoutError propagates."""
    if gold is None:
        return False, None
    try:
        p, g = strip_string(prediction, slash_value_error=True), strip_string(gold, slash_value_error=True)
    except Exception:  # the reference's exception path: it scores math_equal(prediction, prediction)
        ours = math_equal(prediction, gold, symbolic) or prediction == gold
        theirs = math_equal(prediction, prediction, symbolic) or prediction == gold
        return ours, (theirs if theirs != ours else None)
    return math_equal(p, g, symbolic) or p == g, None


def gsm8k_equal(prediction: int, gold: float) -> bool:
    """gsm8k_inference.py: `float(y_pred) == float(gold) or math_equal(y_pred, gold)` (numbers only, no sympy)."""
    return float(prediction) == float(gold) or math_equal(prediction, gold, None)
