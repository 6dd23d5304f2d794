"""Record-level checks for LLaVA conversation data, and the report that says what was kept, repaired and dropped.

The policy (one place, used by data_prep/llava_instruct.py; the training dataset may call `check_record`): a
record is dropped for one of the reasons in milora_vlm.data.skips.REASONS (the table training's skip counters
use too, each with its one-line meaning), or kept with the repairs in milora_vlm.data.skips.REPAIRS.
A record is judged by the first drop reason it meets (cheap checks first, image decoding last). Everything else
in a record (unknown keys, turn fields) passes through untouched, and a record that needs no repair is written
back with the same content (same keys in the same order, same values).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image, resolve_image_path
from .records import record_line
from .skips import REASONS, REPAIRS, SkipSample, check_reason
from .templates import (
    ASSISTANT_ROLES,
    HUMAN_ROLES,
    IMAGE_PLACEHOLDER,
    drop_leading_assistant,
    encode_conversation,
    get_template,
    render_pieces,
)

DROPPED, REPAIRED = "dropped", "repaired"


@dataclass(frozen=True)
class Issue:
    action: str  # DROPPED or REPAIRED
    reason: str  # stable key, counted in the report: a key of skips.REASONS (dropped) or skips.REPAIRS (repaired)
    detail: str

    def __post_init__(self):
        check_reason(self.reason, REASONS if self.action == DROPPED else REPAIRS)


@dataclass
class CheckConfig:
    """What `check_record` checks beyond structure. Plain data, so it can be sent to worker processes."""

    image_folder: str | None = None
    image_check: str = "decode"  # "decode": open and decode fully; "exists": the file exists
    template: str = "vicuna_v1"
    tokenizer: str | None = None  # path: enables the token-length check
    max_length: int | None = None
    image_tokens: int = 0  # how many tokens one <image> becomes (N of the llava processor)
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    allow_images_outside_folder: bool = False

    def __post_init__(self):
        if self.image_check not in ("decode", "exists"):
            raise ValueError(f"image_check must be 'decode' or 'exists', got {self.image_check!r}")
        get_template(self.template)  # unknown names fail here, before any record is read
        if self.tokenizer is not None and self.max_length is None:
            raise ValueError("a tokenizer is given for the length check but no max_length")
        if self.max_length is not None and self.tokenizer is None:
            raise ValueError("max_length needs a tokenizer to count tokens with")


@dataclass
class Verdict:
    """The outcome for one record: `record` is what to write (None when dropped), `issues` what happened."""

    record: dict | None
    issues: list[Issue] = field(default_factory=list)
    token_length: int | None = None

    @property
    def dropped(self) -> bool:
        return self.record is None


def _role(turn: dict, i: int) -> str:
    role = turn.get("from")
    if not isinstance(role, str):
        raise SkipSample("bad_role", f"turn {i}: 'from' is {'missing' if role is None else type(role).__name__}")
    low = role.lower()
    if low not in HUMAN_ROLES | ASSISTANT_ROLES | {"system"}:
        raise SkipSample("bad_role", f"turn {i}: unknown role {role!r}")
    return "human" if low in HUMAN_ROLES else "gpt" if low in ASSISTANT_ROLES else "system"


def check_record(
    rec: dict,
    position: int,
    config: CheckConfig,
    tokenizer=None,
    image_cache: dict | None = None,
) -> Verdict:
    """Check one record against the policy in this module's docstring; repair what it allows.

    `rec` is never modified: a repaired record is a copy. `image_cache` (path -> (reason, detail) or None)
    lets a caller avoid decoding an image that many records share more than once. Duplicate ids are not
    judged here (that needs the whole file): see `DuplicateIds`.
    """
    issues: list[Issue] = []
    out = rec
    convs_copied = False

    def repair(reason: str, detail: str) -> None:
        nonlocal out
        if out is rec:
            out = dict(rec)
        issues.append(Issue(REPAIRED, reason, detail))

    def own_turns() -> list[dict]:
        """The output's turns, copied on first change so that `rec` stays untouched."""
        nonlocal out, convs_copied
        if out is rec:
            out = dict(rec)
        if not convs_copied:
            out["conversations"] = [dict(t) for t in out["conversations"]]
            convs_copied = True
        return out["conversations"]

    try:
        # -- id
        rid = rec.get("id")
        if rid is None or rid == "":
            repair("missing_id", f"no id; set to auto-{position}")
            out["id"] = f"auto-{position}"
        elif not isinstance(rid, str):
            new = str(rid) if isinstance(rid, int) and not isinstance(rid, bool) else f"auto-{position}"
            repair("id_not_string", f"id {rid!r} ({type(rid).__name__}) set to {new!r}")
            out["id"] = new

        # -- conversation structure
        convs = rec.get("conversations")
        if not isinstance(convs, list) or not convs:
            what = "missing" if convs is None else "empty" if convs == [] else f"a {type(convs).__name__}, not a list"
            raise SkipSample("bad_conversations", f"'conversations' is {what}")
        roles = []
        for i, turn in enumerate(convs):
            if not isinstance(turn, dict):
                raise SkipSample("bad_turn", f"turn {i} is a {type(turn).__name__}, not an object")
            roles.append(_role(turn, i))
            value = turn.get("value")
            if not isinstance(value, str):
                raise SkipSample("bad_value", f"turn {i}: 'value' is {'missing' if value is None else type(value).__name__}")
        start = 1 if roles[0] == "system" else 0
        if "system" in roles[start:]:
            raise SkipSample("bad_role", f"turn {roles.index('system', start)}: a system turn is only allowed first")
        if start == len(roles):
            raise SkipSample("empty_conversation", "only a system turn")
        kept = drop_leading_assistant(convs)  # the same rule as training's data.leading_assistant: drop_turn
        if len(kept) < len(convs):
            repair("leading_assistant_turn", f"removed turn {start}, an assistant turn before any question")
            convs = kept
            roles = roles[:start] + roles[start + 1 :]
            out["conversations"] = convs
        for k, role in enumerate(roles[start:]):
            want = "human" if k % 2 == 0 else "gpt"
            if role != want:
                got = convs[start + k]["from"]
                raise SkipSample("roles_not_alternating", f"turn {start + k} is {got!r}, expected {want}")
        if roles[-1] == "human":
            if len(roles) - start == 1:
                raise SkipSample("no_answer", "a single human turn without an answer")
            repair("trailing_human_turn", f"removed the unanswered last turn {len(roles) - 1}")
            out["conversations"] = convs[:-1]
            roles = roles[:-1]
        turns = out["conversations"]
        for i in range(start, len(turns)):
            if not turns[i]["value"].strip():
                raise SkipSample("empty_question" if roles[i] == "human" else "empty_answer", f"turn {i} is empty")

        # -- image field and <image> placeholders
        has_image = "image" in rec
        if has_image and rec["image"] is None:
            repair("null_image", "removed 'image': null")
            del out["image"]
            has_image = False
        if has_image and (not isinstance(rec["image"], str) or not rec["image"].strip()):
            raise SkipSample("bad_image_field", f"'image' is {rec['image']!r}, not a non-empty path string")
        counts = [t["value"].count(IMAGE_PLACEHOLDER) for t in turns]
        for i, n in enumerate(counts):
            if n and roles[i] == "gpt":
                raise SkipSample("image_token_in_answer", f"assistant turn {i} contains {IMAGE_PLACEHOLDER}")
        total = sum(counts)
        if not has_image and total:
            raise SkipSample("image_token_without_image", f"{total} {IMAGE_PLACEHOLDER} but no 'image'")
        if has_image and total > 1:
            raise SkipSample("image_placeholder_count", f"{total} {IMAGE_PLACEHOLDER} placeholders for one image")
        if has_image and counts[start] == 0:
            turns = own_turns()
            if total == 0:
                repair("missing_image_token", f"prepended {IMAGE_PLACEHOLDER}\\n to turn {start}")
            else:
                where = next(i for i, n in enumerate(counts) if n)
                repair("image_token_misplaced", f"moved {IMAGE_PLACEHOLDER} from turn {where} to turn {start}")
                turns[where]["value"] = turns[where]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
                if not turns[where]["value"] and roles[where] == "human":
                    raise SkipSample("empty_question", f"turn {where} is empty once {IMAGE_PLACEHOLDER} is moved out")
            turns[start]["value"] = f"{IMAGE_PLACEHOLDER}\n{turns[start]['value']}"

        # -- what training will do with it: the template must render it, and it must fit
        render_pieces(get_template(config.template), turns, eos_token="")
        length = None
        if tokenizer is not None:
            length = token_length(tokenizer, config, turns, has_image)

        # -- the image file itself (last: the only costly check)
        if has_image:
            path = resolve_image_path(rec["image"], config.image_folder, not config.allow_images_outside_folder)
            bad = image_cache.get(path, False) if image_cache is not None else False
            if bad is False:
                bad = _check_image(path, config.image_check, config.max_image_pixels)
                if image_cache is not None:
                    image_cache[path] = bad
            if bad is not None:
                raise SkipSample(*bad)
    except SkipSample as d:
        return Verdict(None, issues + [Issue(DROPPED, d.reason, d.detail)])
    return Verdict(out, issues, length)


def _check_image(path: str, how: str, max_pixels: int | None) -> tuple[str, str] | None:
    if how == "exists":
        return None if os.path.isfile(path) else ("missing_image", f"image file not found: {path}")
    try:
        load_image(path, max_pixels)
    except SkipSample as e:
        return e.reason, e.detail
    return None


def token_length(tokenizer, config: CheckConfig, conversations: list[dict], has_image: bool) -> int:
    """Sequence length exactly as training builds it (same template and encoder, <image> as N tokens); beyond
    config.max_length, SkipSample too_long."""
    # Only the length is needed, so any id stands in for the image token when the tokenizer lacks one.
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    image_id = image_id if isinstance(image_id, int) and image_id >= 0 else 0
    enc = encode_conversation(
        tokenizer, config.template, conversations,
        image_token_id=image_id if has_image else None,
        num_image_tokens=config.image_tokens if has_image else 0,
        max_length=config.max_length, too_long="drop",  # SkipSample too_long; a huge text is not tokenised at all
    )
    return len(enc.input_ids)


def image_tokens_from_processor(path: str) -> int | None:
    """N for a llava-hf directory: how many image tokens its processor puts in place of one `<image>`.

    Asks the processor itself (on a blank image) rather than re-deriving its formula. None when the
    directory holds no image processor (a plain tokenizer).
    """
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError):
        return None
    if getattr(proc, "image_processor", None) is None or not hasattr(proc, "image_token_id"):
        return None
    from milora_vlm.model.load import check_llava_processor, count_image_tokens

    check_llava_processor(proc, path)  # a clear error (ConfigError) instead of a TypeError below
    return count_image_tokens(proc, proc.image_token_id)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class DuplicateIds:
    """Judges ids across the whole file, in order: the first record with an id keeps it.

    A later record with the same id and identical content (as serialised) is a duplicate and dropped; with
    different content it is renamed `<id>_dup<k>`, the smallest k not yet taken. Memory: one 8-byte digest
    per id.
    """

    def __init__(self):
        self.seen: dict[str, bytes] = {}

    def check(self, record_id: str, line: str) -> tuple[str | None, Issue | None]:
        """(new id or None to keep, issue or None) for a record about to be written as `line`."""
        digest = hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest()
        first = self.seen.get(record_id)
        if first is None:
            self.seen[record_id] = digest
            return None, None
        if first == digest:
            return None, Issue(DROPPED, "duplicate_record", "same id and content as an earlier record")
        k = 1
        while f"{record_id}_dup{k}" in self.seen:
            k += 1
        new = f"{record_id}_dup{k}"
        self.seen[new] = digest
        detail = f"id {record_id!r} already used by a different record; renamed {new!r}"
        return new, Issue(REPAIRED, "duplicate_id", detail)


def text_field(row: dict, name: str, optional: bool = False) -> str:
    """row[name] as a non-empty string, for the format converters; SkipSample("bad_<name>") naming the field.

    optional: a missing or null field is "" (an empty string is then fine too).
    """
    value = row.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise SkipSample(f"bad_{name}", f"field {name!r} is {'missing' if value is None else type(value).__name__}")
    if not optional and not value.strip():
        raise SkipSample(f"bad_{name}", f"field {name!r} is empty")
    return value


# -- running the checks over a file, in parallel, in order --------------------------------------------------

@dataclass
class CheckedRecord:
    """What a worker sends back: small, so that passing it between processes is cheap."""

    position: int
    source_id: str | None  # the id as read (for the report)
    record_id: str | None  # the id written (None when dropped)
    line: str | None  # the record serialised, None when dropped
    issues: list[Issue]
    token_length: int | None


_WORKER: dict = {}


def _init_worker(config: CheckConfig) -> None:
    _WORKER["config"] = config
    _WORKER["tokenizer"] = load_tokenizer(config.tokenizer) if config.tokenizer else None
    _WORKER["image_cache"] = {}


def _id_of(rec: dict | None) -> str | None:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return None if rid is None else str(rid)


def read_error_reason(error: str) -> str:
    """Reason key for an error string of records.iter_records."""
    if error.startswith("not UTF-8"):
        return "not_utf8"
    return "malformed_json" if error.startswith("malformed JSON") else "not_an_object"


def _check_chunk(chunk: list[tuple[int, dict | None, str | None]]) -> list[CheckedRecord]:
    config, tokenizer, cache = _WORKER["config"], _WORKER["tokenizer"], _WORKER["image_cache"]
    results = []
    for position, rec, error in chunk:
        if error is not None:
            issue = Issue(DROPPED, read_error_reason(error), error)
            results.append(CheckedRecord(position, None, None, None, [issue], None))
            continue
        v = check_record(rec, position, config, tokenizer, cache)
        line = None if v.dropped else record_line(v.record)
        results.append(
            CheckedRecord(position, _id_of(rec), None if v.dropped else v.record["id"], line, v.issues, v.token_length)
        )
    return results


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_records(
    records: Iterable[tuple[int, dict | None, str | None]],
    config: CheckConfig,
    workers: int = 0,
    chunk_size: int = 1000,
) -> Iterator[CheckedRecord]:
    """Check `records` (as yielded by records.iter_records) and yield the results in input order.

    workers <= 1 checks in this process. Otherwise chunks go to a process pool (image decoding and
    tokenisation are CPU-bound), at most 2 per worker in flight, so memory stays bounded however large the
    input (Pool.imap would read the whole input ahead). Duplicate ids are the caller's (see DuplicateIds).
    """
    if workers <= 1:
        _init_worker(config)
        for chunk in _chunks(records, chunk_size):
            yield from _check_chunk(chunk)
        return
    import multiprocessing

    # spawn: workers must not inherit a parent's tokenizer threads or open files (fork is unsafe with both).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(config,)) as pool:
        pending: deque = deque()
        for chunk in _chunks(records, chunk_size):
            pending.append(pool.submit(_check_chunk, chunk))
            while len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# -- the report ----------------------------------------------------------------------------------------------

def report_path_for(output: str | os.PathLike) -> str:
    """OUT.jsonl / OUT.json -> OUT.report.json, next to the output."""
    out = os.fspath(output)
    for ext in (".jsonl", ".json"):
        if out.endswith(ext):
            return out[: -len(ext)] + ".report.json"
    return out + ".report.json"


class Report:
    """Counts and lists every record that was dropped or repaired, with its id and line (or array index).

    Every issue is listed (not a sample): "nothing lost silently" means a user can find each one.
    """

    def __init__(self, tool: str, position_kind: str = "line", **header):
        self.tool = tool
        self.position_kind = position_kind  # what a record's position counts: "line" or "index"
        self.header = header
        self.read = self.kept = self.repaired = self.dropped = 0
        self.written: int | None = None  # set by the caller when records and output lines differ in number
        self.dropped_by_reason: Counter = Counter()
        self.repaired_by_reason: Counter = Counter()
        self.issues: list[dict] = []
        self.extra: dict = {}

    def add(self, issues: list[Issue], record_id: str | None, position: int | None) -> None:
        """Account for one record read: kept (repaired if it has issues) unless one of its issues is a drop."""
        self.read += 1
        if any(i.action == DROPPED for i in issues):
            self.dropped += 1
        else:
            self.kept += 1
            self.repaired += bool(issues)
        for issue in issues:
            (self.dropped_by_reason if issue.action == DROPPED else self.repaired_by_reason)[issue.reason] += 1
            entry = {"action": issue.action, "reason": issue.reason, "id": record_id}
            if position is not None:
                entry[self.position_kind] = position
            entry["detail"] = issue.detail
            self.issues.append(entry)

    def drop(self, reason: str, detail: str, record_id: str | None = None, position: int | None = None) -> None:
        self.add([Issue(DROPPED, reason, detail)], record_id, position)

    def keep(self, record_id: str | None = None, position: int | None = None) -> None:
        self.add([], record_id, position)

    @property
    def clean(self) -> bool:
        """Nothing dropped and nothing repaired (what --strict demands)."""
        return not self.issues

    def to_dict(self) -> dict:
        return {
            "tool": self.tool,
            **self.header,
            "records_read": self.read,
            "records_kept": self.kept,
            "records_unchanged": self.kept - self.repaired,
            "records_repaired": self.repaired,
            "records_dropped": self.dropped,
            "records_written": self.kept if self.written is None else self.written,
            "dropped_by_reason": dict(sorted(self.dropped_by_reason.items())),
            "repaired_by_reason": dict(sorted(self.repaired_by_reason.items())),
            **self.extra,
            "issues": self.issues,
        }

    def write(self, path: str) -> None:
        """Indented header, then one issue per line: readable, and grep-able when there are 100K of them."""
        data = self.to_dict()
        issues = data.pop("issues")
        head = json.dumps(data, ensure_ascii=False, indent=1)[: -len("\n}")]
        lines = ",\n  ".join(json.dumps(i, ensure_ascii=False) for i in issues)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f'{head},\n "issues": [' + (f"\n  {lines}\n ]" if issues else "]") + "\n}\n")
        os.replace(tmp, path)

    def summary(self, examples: int = 3) -> str:
        lines = [
            f"{self.tool}: read {self.read}, kept {self.kept} ({self.repaired} repaired), dropped {self.dropped}"
        ]
        for counts, action in ((self.dropped_by_reason, DROPPED), (self.repaired_by_reason, REPAIRED)):
            for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                first = [i for i in self.issues if i["action"] == action and i["reason"] == reason][:examples]
                where = ", ".join(f"{self.position_kind} {i.get(self.position_kind)} id={i['id']}" for i in first)
                lines.append(f"  {action:8s} {reason:26s} {n:8d}   e.g. {where}")
        return "\n".join(lines)


def finish(report: Report, report_path: str, strict: bool, out=sys.stdout) -> int:
    """Write the report, print its summary, and return the exit status (1 under --strict if not clean)."""
    report.write(report_path)
    print(report.summary(), file=out)
    print(f"report: {report_path}", file=out)
    if strict and not report.clean:
        print(f"--strict: {len(report.issues)} record(s) dropped or repaired; failing", file=sys.stderr)
        return 1
    return 0


def convert_records(
    items: Iterable[tuple[int, object, str | None]],
    convert: Callable[[int, object], dict],
    writer,
    report: Report,
    id_of: Callable[[int, object], str | None] = lambda position, item: None,
) -> None:
    """Shared loop of the format converters: convert each (position, item, read_error), write it, or count why not.

    `items` is shaped like records.iter_records' output; `convert(position, item)` returns a conversation
    record or raises SkipSample(reason, detail).
    """
    for position, item, error in items:
        if error is not None:
            report.drop(read_error_reason(error), error, None, position)
            continue
        try:
            rec = convert(position, item)
        except SkipSample as e:
            report.drop(e.reason, e.detail, id_of(position, item), position)
            continue
        writer.write(rec)
        report.keep(rec.get("id"), position)
