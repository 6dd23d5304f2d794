"""MATH (Hendrycks et al.): the strict default protocol, and the MiLoRA paper's grader (`--protocol milora`).

Both read the prediction as MetaMath's eval_math.py (and the MiLoRA repository's MATH_inference.py) do: the text
after the last "The answer is: ", cut at the first ".\\n", stripped, one trailing '.' dropped. Gold: the record's
`answer`, else the last \\boxed{...} of its `solution` / `output`; a solution without a braced \\boxed{...}
(`\\boxed 7`, `\\fbox{3}`) has no gold answer there, so the item is wrong, and here it is also counted and named.

strict (default, this project's own): Hendrycks' `strip_string` (units, \\left/\\right, dfrac, a/b ->
\\frac{a}{b}, ...) on both, compared as strings; if that fails, as plain numbers (relative 1e-6); if that fails,
symbolically with sympy under a per-item time limit. An exception while normalising makes the item WRONG and
is counted. MetaMath's eval_math.py is the string comparison alone (an exception there compares raw strings).
milora: the grader the MiLoRA paper's MATH and GSM8K figures come from, see milora_grader.py.
"""

from __future__ import annotations

import math
import multiprocessing
import re
from collections import defaultdict

from .inputs import EvalInputError, Result, align, coverage_warnings, load_numbered_records, load_predictions, pct, record_id

ANSWER_MARK = "The answer is: "


# --- Hendrycks' normalisation (math_equivalence.py of the MATH release), rule for rule -------------------------

def _fix_fracs(string: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}; raises IndexError on a trailing "\\frac"."""
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr[0] == "{":
            new_str += substr
        else:
            if len(substr) < 2:
                return string
            a, b = substr[0], substr[1]
            if b != "{":
                new_str += "{" + a + "}{" + b + "}" + substr[2:]
            else:
                new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str, value_error: bool = False) -> str:
    """3/4 -> \\frac{3}{4}. A part that is no integer ("\\pi/2") leaves the string as it is, as in Hendrycks'
    release; with value_error, int()'s ValueError goes out, as in MetaMath's and MiLoRA's copies."""
    if len(string.split("/")) != 2:
        return string
    a, b = string.split("/")
    try:
        a_int, b_int = int(a), int(b)
    except ValueError:
        if value_error:
            raise
        return string
    if string != f"{a_int}/{b_int}":
        return string
    return "\\frac{" + str(a_int) + "}{" + str(b_int) + "}"


def _remove_right_units(string: str) -> str:
    """Drop "\\text{ units}" on the right; raises AssertionError when it occurs twice (as the reference)."""
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        assert len(splits) == 2
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    """\\sqrt3 -> \\sqrt{3}; raises IndexError on a trailing "\\sqrt" (as the reference)."""
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if split[0] != "{":
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def strip_string(string: str, slash_value_error: bool = False) -> str:
    """Hendrycks' normalisation; slash_value_error: the MiLoRA grader's variant (see _fix_a_slash_b)."""
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    # "k = 3" -> "3" when the left side is at most two characters
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string, slash_value_error)


def last_boxed_only_string(string: str) -> str | None:
    """The last "\\boxed{...}" (or "\\fbox{...}") with balanced braces, or None."""
    idx = string.rfind("\\boxed")
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        if string[i] == "{":
            depth += 1
        elif string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx : i + 1]
    return None


def remove_boxed(s: str | None) -> str | None:
    left = "\\boxed{"
    if s is None or not s.startswith(left) or not s.endswith("}"):
        return None
    return s[len(left) : -1]


def extract_math_answer(completion: str) -> str | None:
    parts = completion.split(ANSWER_MARK)
    if len(parts) < 2:
        return None
    ans = parts[-1].split(".\n")[0].strip()
    if ans.endswith("."):
        ans = ans[:-1]
    return ans.strip()


# --- numeric and symbolic comparison (beyond the reference's string match) -----------------------------------

_PLAIN_NUMBER = re.compile(r"[-+]?(\d+(,\d{3})*(\.\d*)?|\.\d+)")
_FRAC_NUMBER = re.compile(r"([-+]?)\\frac\{(-?\d+)\}\{(-?\d+)\}")


def to_number(s: str) -> float | None:
    """A normalised answer that is a plain number ("1,000", "-2.5") or \\frac{a}{b} of integers, else None (also
    when it is too large for a float: a model's runaway digits are not a crash)."""
    try:
        if _PLAIN_NUMBER.fullmatch(s):
            value = float(s.replace(",", ""))
            return value if math.isfinite(value) else None
        m = _FRAC_NUMBER.fullmatch(s)
        if m and int(m.group(3)) != 0:
            return (-1 if m.group(1) == "-" else 1) * int(m.group(2)) / int(m.group(3))
    except (OverflowError, ValueError):  # int / float overflow, or more digits than int() converts
        return None
    return None


def _latex_to_sympy_text(s: str) -> str:
    """The small LaTeX subset MATH answers use -> sympy syntax. Hand-written because sympy's own parse_latex
    needs the antlr4 runtime, which this project does not depend on."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi").replace("\\infty", "oo")
    for _ in range(10):  # innermost-first rewriting of \frac{..}{..} and \sqrt[n]{..} / \sqrt{..}
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\sqrt\[([^\[\]{}]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    return s.replace("{", "(").replace("}", ")").replace("^", "**")


def sympy_equal(a: str, b: str) -> bool:
    """Symbolic equality of two normalised answers (runs in a worker process: see TimeLimitedWorker)."""
    from sympy import simplify
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        ea = parse_expr(_latex_to_sympy_text(a), transformations=transformations, evaluate=True)
        eb = parse_expr(_latex_to_sympy_text(b), transformations=transformations, evaluate=True)
        return bool(simplify(ea - eb) == 0)
    except Exception:  # anything sympy cannot parse or subtract is "not shown equal"
        return False


class TimeLimitedWorker:
    """Runs a function in one reusable worker process and kills it past a time limit.

    A signal-based timeout cannot interrupt sympy inside a long C-level big-integer operation, and
    concurrent.futures cannot kill a running task, hence this small wrapper around multiprocessing.Pool.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._pool = None

    def __call__(self, fn, *args):
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1)
        try:
            return self._pool.apply_async(fn, args).get(timeout=self.seconds)
        except multiprocessing.TimeoutError:
            self.close()
            raise TimeoutError(f"over {self.seconds} s") from None

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def math_equal(prediction: str, gold: str, symbolic: TimeLimitedWorker | None) -> tuple[bool, str]:
    """(equal, how): how is "string", "numeric", "symbolic", "different", "normalisation_error" or "timeout"."""
    try:
        p, g = strip_string(prediction), strip_string(gold)
    except Exception:
        return False, "normalisation_error"
    if p == g:
        return True, "string"
    pn, gn = to_number(p), to_number(g)
    if pn is not None and gn is not None:
        same = math.isclose(pn, gn, rel_tol=1e-6, abs_tol=1e-9)
        return same, "numeric" if same else "different"
    if symbolic is None or not p or not g:
        return False, "different"
    try:
        return (True, "symbolic") if symbolic(sympy_equal, p, g) else (False, "different")
    except TimeoutError:
        return False, "timeout"


PROTOCOLS = ("strict", "milora")


def math_gold(rec: dict, path: str, line_no: int) -> str | None:
    """The gold answer; None for a solution without a braced \\boxed{...} (scored wrong and counted)."""
    if isinstance(rec.get("answer"), str):
        return rec["answer"]
    for field in ("solution", "output"):
        if isinstance(rec.get(field), str):
            return remove_boxed(last_boxed_only_string(rec[field]))
    raise EvalInputError(f"{path}:{line_no}: missing gold field 'answer' (or 'solution' / 'output')")


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise EvalInputError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")


def score_math(predictions: str, questions: str, time_limit: float = 5.0, allow_unknown: bool = False,
               protocol: str = "strict") -> Result:
    """`questions`: the MATH test set (Hendrycks' "problem"/"solution", MetaMath's MATH_test.jsonl
    "instruction"/"output", or this project's question JSONL with `answer`); records without `question_id` are
    numbered from 0. strict: time_limit <= 0 turns the symbolic comparison off; milora: time_limit <= 0 runs
    sympy without a limit, as the reference does."""
    from . import milora_grader  # imports this module

    check_protocol(protocol)
    gold: dict[str, tuple[str | None, str | None]] = {}
    no_boxed: list[str] = []
    for index, (line_no, rec) in enumerate(load_numbered_records(questions)):
        qid = record_id(rec, line_no, index, questions, allow_index=True)
        if qid in gold:
            raise EvalInputError(f"{questions}:{line_no}: duplicate question_id {qid!r}")
        answer = math_gold(rec, questions, line_no)
        if answer is None:
            no_boxed.append(f"{questions}:{line_no}")
        gold[qid] = (answer, rec.get("type"))
    preds = load_predictions(predictions)
    aligned, counts = align(list(gold), preds, allow_unknown)
    symbolic = TimeLimitedWorker(time_limit) if time_limit > 0 else None
    how_counts: dict[str, int] = defaultdict(int)
    per_type: dict[str, list[bool]] = defaultdict(list)
    correct = reference_correct = 0
    try:
        for qid, text in aligned.items():
            answer, subject = gold[qid]
            pred = extract_math_answer(text) if text is not None else None
            if text is not None and pred is None:
                counts.unparsable += 1
            reference_ok = None
            if pred is None:
                ok, how = False, "no_answer"
            elif answer is None:
                ok, how = False, "gold_without_boxed"
            elif protocol == "strict":
                ok, how = math_equal(pred, answer, symbolic)
            else:
                try:
                    ok, reference_ok = milora_grader.is_equiv(pred, answer, symbolic)
                    how = "equal" if ok else "different"
                    if reference_ok is not None:
                        how = "exception_path"
                except TimeoutError:
                    ok, how = False, "timeout"
            how_counts[how] += 1
            correct += ok
            reference_correct += ok if reference_ok is None else reference_ok
            if subject is not None:
                per_type[str(subject)].append(ok)
    finally:
        if symbolic is not None:
            symbolic.close()
    accuracy = pct(correct, len(aligned))
    metrics = {"accuracy": accuracy, "protocol": protocol, "decided_by": dict(sorted(how_counts.items()))}
    if per_type:
        metrics["per_type"] = {t: pct(sum(v), len(v)) for t, v in sorted(per_type.items())}
    warnings = coverage_warnings(counts)
    if no_boxed:
        warnings.append(f"{len(no_boxed)} gold solutions have no braced \\boxed{{...}} answer, scored wrong as the "
                        f"references do: {', '.join(no_boxed[:5])}")
    if how_counts.get("normalisation_error"):
        warnings.append(f"{how_counts['normalisation_error']} items raised in strip_string: scored WRONG")
    if protocol == "milora":
        metrics["accuracy_with_reference_exception_path"] = pct(reference_correct, len(aligned))
        if how_counts.get("exception_path"):
            warnings.append(f"{how_counts['exception_path']} items raised in strip_string and were scored by "
                            "comparing prediction and gold; the reference grader scores them RIGHT "
                            "(accuracy_with_reference_exception_path)")
    if how_counts.get("timeout"):
        warnings.append(f"{how_counts['timeout']} symbolic comparisons ran past {time_limit} s: scored wrong")
    description = ("milora: MiLoRA repo MATH_inference.py + grader.math_equal" if protocol == "milora" else
                   "strict: MetaMath extraction + Hendrycks strip_string, numeric, sympy")
    return Result("math", accuracy, metrics, counts, description, warnings)
