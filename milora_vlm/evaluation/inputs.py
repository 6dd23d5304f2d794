"""Reading gold and prediction files for scoring, with errors that name file, line and field.

Official evaluation files come as JSON documents, JSONL, and JSONL named `.json` (POPE's label files), so
`load_json_any` decides by content, not by extension (records.iter_records, used for training data, goes by
the extension). Ids are compared as strings everywhere: VQA's integer ids and LLaVA's string ids for the same
question must meet.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .. import jsontext


class EvalInputError(ValueError):
    """An input that cannot be scored without guessing. The message names the file, line and field."""


class JsonlRecords(list):
    """Records of a JSONL file as (line_no, record) pairs, so errors can name the line."""


def decode_utf8(data: bytes, path: str) -> str:
    """`data` as text (a UTF-8 byte-order mark is dropped); bytes that are not UTF-8 are an EvalInputError
    naming the line, column and byte, since guessing another encoding could silently change answers."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise EvalInputError(f"{path}:{line_no}: not UTF-8 (byte {data[e.start]:#04x} at column {column}); "
                             "re-encode the file as UTF-8") from None


def load_json_any(path: str | os.PathLike) -> Any:
    """A JSON document (any shape), or a list of the records of a JSONL file.

    A malformed JSONL line raises EvalInputError with its line number; a bad last line usually means a
    generation run was killed mid-write (eval/generate.py repairs that when resumed).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read(jsontext.MAX_FILE_BYTES + 1)
    if len(data) > jsontext.MAX_FILE_BYTES:
        raise EvalInputError(f"{path}: larger than {jsontext.MAX_FILE_BYTES >> 20} MiB; not read")
    text = decode_utf8(data, path)
    if not path.endswith(".jsonl"):
        try:
            return jsontext.parse(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):  # a JSON document, not JSONL: report its own error
                raise EvalInputError(f"{path}: malformed JSON: {jsontext.decode_error(e)}") from None
    records = JsonlRecords()
    lines = text.split("\n")  # not splitlines(): U+2028 and other separators may stand unescaped in JSON strings
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((line_no, jsontext.parse(line.rstrip("\r"))))
        except json.JSONDecodeError as e:
            hint = " (the last line: was a generation run killed? eval/generate.py repairs it on resume)" if (
                line_no == last
            ) else ""
            raise EvalInputError(f"{path}:{line_no}: malformed JSON: {jsontext.decode_error(e, line=False)}{hint}") from None
    return records


def iter_numbered(data: Any, path: str) -> Iterable[tuple[int, dict]]:
    """(line_or_index, record) for a JSONL file or a JSON array of objects; anything else is an error."""
    if isinstance(data, JsonlRecords):
        pairs = list(data)
    elif isinstance(data, list):
        pairs = list(enumerate(data, start=1))
    else:
        raise EvalInputError(f"{path}: expected a JSON array or JSONL of records, got a JSON {type(data).__name__}")
    for line_no, rec in pairs:
        if not isinstance(rec, dict):
            raise EvalInputError(f"{path}:{line_no}: record is a {type(rec).__name__}, not an object")
        yield line_no, rec


def load_numbered_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Every record of a gold / question / prediction file as (line_or_index, record), strictly: any unreadable
    record is an EvalInputError naming file and line (scoring must not guess). Training data are read leniently,
    each bad record counted and skipped, by milora_vlm.data.records.iter_records."""
    path = os.fspath(path)
    return list(iter_numbered(load_json_any(path), path))


def require(rec: dict, key: str, path: str, line_no: int, types: type | tuple = (str,)) -> Any:
    """rec[key], or an EvalInputError naming file, line and field."""
    if key not in rec:
        raise EvalInputError(f"{path}:{line_no}: missing field {key!r}")
    value = rec[key]
    if not isinstance(value, types):
        raise EvalInputError(f"{path}:{line_no}: field {key!r} is a {type(value).__name__}, expected {types}")
    return value


def first_key(rec: dict, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in rec), None)


def record_id(rec: dict, line_no: int, index: int, path: str, keys: Sequence[str] = ("question_id",),
              allow_index: bool = False) -> str:
    """The record's id as a string. With allow_index, a record without one gets its 0-based position in the file
    (LLM-Adapters' and MetaMath's test files carry no ids; eval/generate.py numbers them the same way)."""
    key = first_key(rec, keys)
    if key is None:
        if allow_index:
            return str(index)
        raise EvalInputError(f"{path}:{line_no}: missing id field (one of {list(keys)})")
    value = rec[key]
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise EvalInputError(f"{path}:{line_no}: id field {key!r} is a {type(value).__name__}, expected str or int")
    return str(value)


@dataclass
class Predictions:
    """One prediction file: id -> text.

    raw_generations: the records carry `text` (this project's answers JSONL from eval/generate.py, or LLaVA's),
    i.e. raw model output that a benchmark's conversion step still has to post-process; otherwise they carry
    an official result field (`answer`, `prediction`) and are scored as the official evaluator scores them.
    """

    path: str
    texts: dict[str, str]
    lines: dict[str, int]
    raw_generations: bool


def load_predictions(
    path: str | os.PathLike,
    id_keys: Sequence[str] = ("question_id",),
    answer_keys: Sequence[str] = ("answer",),
    key_fn: Callable[[dict, str], str] | None = None,
) -> Predictions:
    """Read a prediction file: this project's / LLaVA's answers JSONL (`question_id`, `text`, ...) or an official
    result list (`answer_keys` holds the text). `key_fn(record, id)` may build a compound key (LLaVA's TextVQA
    and MME answers repeat a question_id for different questions); it raises ValueError for a record it cannot
    key, and the error is reported with file and line."""
    path = os.fspath(path)
    texts: dict[str, str] = {}
    lines: dict[str, int] = {}
    kinds: set[str] = set()
    for index, (line_no, rec) in enumerate(load_numbered_records(path)):
        qid = record_id(rec, line_no, index, path, keys=id_keys)
        if key_fn is not None:
            try:
                qid = key_fn(rec, qid)
            except ValueError as e:
                raise EvalInputError(f"{path}:{line_no}: {e}") from None
        if "text" in rec:
            kinds.add("text")
            text = require(rec, "text", path, line_no)
        else:
            key = first_key(rec, answer_keys)
            if key is None:
                raise EvalInputError(
                    f"{path}:{line_no}: missing prediction field ('text' or one of {list(answer_keys)})"
                )
            kinds.add(key)
            text = require(rec, key, path, line_no)
        if len(kinds) > 1:
            raise EvalInputError(f"{path}:{line_no}: mixes prediction fields {sorted(kinds)} in one file")
        if qid in texts:
            raise EvalInputError(f"{path}:{line_no}: duplicate prediction for {qid!r} (first at line {lines[qid]})")
        texts[qid] = text
        lines[qid] = line_no
    if not texts:  # every question would score as missing: a wrong path or a generation that never ran
        raise EvalInputError(f"{path}: no predictions in the file (is it the answers file the generation wrote?)")
    return Predictions(path, texts, lines, raw_generations=kinds == {"text"})


@dataclass
class Counts:
    """How the predictions covered the gold set. Missing and unparsable predictions are scored as wrong."""

    gold: int = 0
    predicted: int = 0
    missing: int = 0
    unparsable: int = 0
    unknown_ignored: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def align(
    gold_ids: Sequence[str],
    preds: Predictions,
    allow_unknown: bool = False,
    what: str = "question",
) -> tuple[dict[str, str | None], Counts]:
    """{gold id: prediction text or None (missing)} over the gold ids, and the counts.

    A prediction whose id is not in the gold set means the wrong gold file (or a corrupted prediction file):
    an error unless allow_unknown, then a counted warning.
    """
    if not gold_ids:
        raise EvalInputError(f"the gold file holds no {what}s to score")
    gold_set = set(gold_ids)
    unknown = [qid for qid in preds.texts if qid not in gold_set]
    if unknown and not allow_unknown:
        examples = ", ".join(f"{q!r} (line {preds.lines[q]})" for q in unknown[:5])
        raise EvalInputError(
            f"{preds.path}: {len(unknown)} prediction(s) have {what} ids not in the gold file, e.g. {examples}; "
            "wrong gold file? (pass --allow-unknown to ignore them)"
        )
    aligned = {qid: preds.texts.get(qid) for qid in gold_ids}
    counts = Counts(
        gold=len(gold_ids),
        predicted=sum(t is not None for t in aligned.values()),
        unknown_ignored=len(unknown),
    )
    counts.missing = counts.gold - counts.predicted
    return aligned, counts


def pct(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


@dataclass
class Result:
    task: str
    score: float
    metrics: dict
    counts: Counts
    protocol: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {
            "task": self.task,
            "score": self.score,
            "metrics": self.metrics,
            "counts": self.counts.to_dict(),
            "protocol": self.protocol,
        }
        if self.warnings:
            out["warnings"] = self.warnings
        return out


def coverage_warnings(counts: Counts, what: str = "questions") -> list[str]:
    out = []
    if counts.missing:
        out.append(f"{counts.missing} of {counts.gold} {what} have no prediction; scored as wrong")
    if counts.unparsable:
        out.append(f"{counts.unparsable} predictions could not be parsed into an answer; scored as wrong")
    if counts.unknown_ignored:
        out.append(f"{counts.unknown_ignored} predictions with unknown ids were ignored (--allow-unknown)")
    return out
