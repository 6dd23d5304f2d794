"""ScienceQA: option-letter accuracy, overall and on the questions with an image (ScienceQA-IMG, the number
LLaVA-1.5 and the MiLoRA paper report as "SQA").

The letter is read from a generation as LLaVA's eval_science_qa.py reads it: the whole text is a letter ("A"),
or starts with a letter and ". " ("A. mammal"), or contains exactly one "The answer is X." (regex
`The answer is ([A-Z]).`, whose '.' matches any character); otherwise it is unparsable. A letter beyond the
problem's choices is wrong. "Has an image" is read from the problem's `image` field (LLaVA looks for
"<image>" in the prompt it stored, which is equivalent for its own prompts).
"""

from __future__ import annotations

import re

from .inputs import EvalInputError, Result, align, coverage_warnings, load_json_any, load_predictions, pct

OPTIONS = ["A", "B", "C", "D", "E"]
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(text: str) -> str | None:
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def score_scienceqa(
    predictions: str,
    problems: str,
    split: str = "test",
    split_file: str | None = None,
    allow_unknown: bool = False,
) -> Result:
    data = load_json_any(problems)
    if not isinstance(data, dict):
        raise EvalInputError(f"{problems}: expected ScienceQA's problems object {{problem_id: problem}}")
    if split_file is not None:
        splits = load_json_any(split_file)
        if not isinstance(splits, dict) or split not in splits:
            raise EvalInputError(f"{split_file}: no split {split!r}")
        ids = [str(i) for i in splits[split]]
        unknown = [i for i in ids if i not in data]
        if unknown:
            raise EvalInputError(f"{split_file}: split {split!r} names problems not in {problems}, e.g. {unknown[:3]}")
    else:
        ids = [str(pid) for pid, p in data.items() if isinstance(p, dict) and p.get("split") == split]
        if not ids:  # a misspelt --split: name the ones there are
            present = sorted({str(p.get("split")) for p in data.values() if isinstance(p, dict)})
            raise EvalInputError(f"{problems}: no problem has split {split!r}; its splits: {', '.join(present) or 'none'}")
    for pid in ids:
        p = data[pid]
        if not isinstance(p, dict) or not isinstance(p.get("choices"), list) or not isinstance(p.get("answer"), int):
            raise EvalInputError(f"{problems}: problem {pid!r} needs a 'choices' list and an integer 'answer'")
    preds = load_predictions(predictions)
    aligned, counts = align(ids, preds, allow_unknown, what="problem")
    correct, with_image, with_image_correct = 0, 0, 0
    for pid, text in aligned.items():
        p = data[pid]
        letter = scienceqa_letter(text) if text is not None else None
        if text is not None and letter is None:
            counts.unparsable += 1
        ok = letter in OPTIONS[: len(p["choices"])] and OPTIONS.index(letter) == p["answer"]
        correct += ok
        if p.get("image"):
            with_image += 1
            with_image_correct += ok
    metrics = {
        "accuracy": pct(correct, len(aligned)),
        "img_accuracy": pct(with_image_correct, with_image),
        "num_img": with_image,
        "split": split,
    }
    warnings = coverage_warnings(counts)
    if with_image == 0:
        warnings.append("no problem in this split has an image: img_accuracy is 0 by convention")
    return Result("scienceqa", metrics["img_accuracy"], metrics, counts,
                  "LLaVA eval_science_qa.py letter parsing; score = IMG accuracy", warnings)
