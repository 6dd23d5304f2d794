"""Reading and writing LLaVA-style conversation files and their images, with errors that name file, line and field.

Used by the data_prep validators and by the training dataset, so both judge a record the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Iterable, Iterator

from .. import jsontext


class RecordFileError(ValueError):
    """A conversation file that cannot be read at all (not one bad record: the whole file)."""


def position_kind(path: str | os.PathLike) -> str:
    """What the position yielded by `iter_records` counts: "line" (JSONL) or "index" (1-based, JSON array)."""
    return "line" if os.fspath(path).endswith(".jsonl") else "index"


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield (line_or_index, record, error) for a .json (array) or .jsonl file.

    JSONL is streamed line by line; a malformed line yields (line_no, None, "malformed JSON: ...") instead of
    aborting, so callers count it. A .json file must hold one array; records are numbered from 1. The array is
    streamed too (LLaVA-665K's JSON is 1 GB); a malformed array cannot be resynchronised, so it raises
    RecordFileError naming the line, after yielding the records before it.
    Blank JSONL lines are skipped. A record that is not an object yields an error too.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise RecordFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(2) in jsontext.UTF16_BOMS:  # every line would be dropped as not UTF-8: say why, once
            raise RecordFileError(f"{path}: the file is UTF-16 (byte-order mark); re-save it as UTF-8")
    if path.endswith(".jsonl"):
        # Lines are decoded one by one, so a stray non-UTF-8 byte costs its record, not the file.
        with open(path, "rb") as f:
            for line_no, raw in jsontext.iter_lines(f):
                if raw is None:
                    yield line_no, None, f"malformed JSON: a line longer than {jsontext.MAX_LINE_BYTES:,} bytes"
                    continue
                try:
                    # utf-8-sig: a byte-order mark (written by some Windows tools) would otherwise break line 1.
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield line_no, None, f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                    continue
                if not line.strip():
                    continue
                try:
                    rec = jsontext.parse(line.rstrip("\r\n"))  # a cut-off line's error at its real column
                except json.JSONDecodeError as e:
                    yield line_no, None, f"malformed JSON: {jsontext.decode_error(e, line=False)}"
                    continue
                if not isinstance(rec, dict):
                    yield line_no, None, f"record is a {type(rec).__name__}, not an object"
                    continue
                yield line_no, rec, None
        return
    # surrogateescape: a non-UTF-8 byte becomes a lone surrogate in the text, found in its record's span (below).
    with open(path, "r", encoding="utf-8-sig", errors="surrogateescape") as f:
        for idx, (rec, err) in enumerate(_JsonArrayStream(f, path), start=1):
            if err is not None:
                yield idx, None, err
            elif not isinstance(rec, dict):
                yield idx, None, f"record is a {type(rec).__name__}, not an object"
            else:
                yield idx, rec, None


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a non-UTF-8 byte
_PLAIN = json.JSONDecoder()  # only to find where a refused element ends


class _JsonArrayStream:
    """Iterate over the elements of a top-level JSON array without loading the file.

    Written by hand because the standard library has no incremental parser and ijson is not a dependency:
    the buffer is refilled in 1 MiB reads and each element is parsed with `JSONDecoder.raw_decode`.
    """

    READ_SIZE = 1 << 20
    MAX_RECORD_CHARS = jsontext.MAX_LINE_BYTES  # beyond this, a record that still does not parse is malformed, not cut

    def __init__(self, f, path: str):
        self.f, self.path = f, path
        self.buf, self.i, self.eof = "", 0, False
        self.line_base = 1  # line number of buf[0]

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(self.READ_SIZE)
        if not chunk:
            self.eof = True
            return False
        self.line_base += self.buf.count("\n", 0, self.i)
        self.buf, self.i = self.buf[self.i :] + chunk, 0
        return True

    def _peek(self) -> str:
        """The next non-whitespace character ("" at end of file), without consuming it."""
        while True:
            self.i = jsontext.WHITESPACE.match(self.buf, self.i).end()
            if self.i < len(self.buf):
                return self.buf[self.i]
            if not self._more():
                return ""

    def _error(self, msg: str, pos: int | None = None) -> RecordFileError:
        line = self.line_base + self.buf.count("\n", 0, self.i if pos is None else pos)
        return RecordFileError(f"{self.path}: {msg} at line {line}")

    def _decode(self):
        """The next element and None, or None and what is wrong with that element (it is skipped, not the file)."""
        while True:
            try:
                obj, end = jsontext.raw_decode(self.buf, self.i)
                err = None
            except json.JSONDecodeError as e:
                try:  # complete but refused (a duplicate key, a lone surrogate)? Then only this record is bad.
                    _, end = _PLAIN.raw_decode(self.buf, self.i)
                    obj, err = None, f"malformed JSON: {jsontext.reason(e)}"
                except (json.JSONDecodeError, RecursionError):
                    # Either the element is cut by the buffer's end (read more) or it is malformed.
                    if len(self.buf) - self.i > self.MAX_RECORD_CHARS or not self._more():
                        raise self._error(f"malformed JSON ({jsontext.reason(e)})", e.pos) from None
                    continue
            if end == len(self.buf) and self._more():
                continue  # a bare number may have been cut at the buffer's end: parse again with more text
            bad = _ESCAPED_BYTE.search(self.buf, self.i, end)
            self.i = end
            if bad is not None:
                return None, f"not UTF-8: byte 0x{ord(bad.group()) - 0xDC00:02x}"
            return obj, err

    def __iter__(self):
        first = self._peek()
        if first != "[":
            kind = {"": "an empty file", "{": "an object"}.get(first, f"{first!r}")
            hint = " (one record per line belongs in a .jsonl file)" if first == "{" else ""
            raise self._error(f"expected a JSON array of records, got {kind}{hint}")
        self.i += 1
        if self._peek() == "]":
            self.i += 1
        else:
            while True:
                yield self._decode()
                sep = self._peek()
                self.i += 1
                if sep == "]":
                    break
                if sep != ",":
                    got = repr(sep) if sep else "end of file"
                    raise self._error(f"malformed JSON (expected ',' or ']' after a record, got {got})")
                if self._peek() == "":
                    raise self._error("malformed JSON (file ends inside the array)")
        if self._peek() != "":
            raise self._error("malformed JSON (text after the closing ']')")


_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


def iter_source(source: str, split: str = "train") -> Iterator[tuple[int, dict | None, str | None]]:
    """Like `iter_records`, for a local .json/.jsonl file or a Hugging Face hub data set named owner/name.

    Hub data sets are read through `datasets.load_dataset(source, split=split)`; rows are numbered from 1.
    """
    if os.path.exists(source):
        yield from iter_records(source)
        return
    if source.endswith((".json", ".jsonl")):  # a file name (data/x.json also looks like owner/name): not the hub
        raise RecordFileError(f"{source}: no such file")
    if not _HUB_NAME.fullmatch(source):
        raise RecordFileError(f"{source}: no such file, and not a hub data set name of the form owner/name")
    from datasets import load_dataset  # imported here: only the hub path needs it, and it is slow to import

    try:
        rows = load_dataset(source, split=split)
    except Exception as e:  # network, authentication, unknown name or split: all end the run the same way
        raise RecordFileError(f"cannot load hub data set {source!r} split {split!r}: {type(e).__name__}: {e}") from e
    for idx, row in enumerate(rows, start=1):
        yield idx, dict(row), None


def output_path(value: str) -> str:
    """argparse `type` of a data_prep --output: RecordWriter picks JSONL or a JSON array by the name, so any other
    name (out.txt) would be written in a format the reader of that name cannot guess."""
    if not value.endswith((".json", ".jsonl")):
        raise argparse.ArgumentTypeError(f"{value!r}: give a .jsonl file (one record per line) or .json (an array)")
    return value


def record_line(record: dict) -> str:
    """A record as the single line of JSON that RecordWriter writes (UTF-8 text kept as is, not \\u-escaped)."""
    return json.dumps(record, ensure_ascii=False)


def write_records(path: str | os.PathLike, records: Iterable[dict], lines: bool | None = None) -> int:
    """Write every record with a RecordWriter (atomic; .jsonl or a .json array by the name, or JSONL whatever the
    name with lines=True); returns how many."""
    with RecordWriter(path, lines=lines) as writer:
        for record in records:
            writer.write(record)
    return writer.count


class RecordWriter:
    """Write records to .jsonl (one per line) or .json (an array, one record per line), atomically.

    Records go to PATH.tmp, renamed to PATH when the `with` block ends without an exception (removed
    otherwise), so an interrupted run never leaves a half-written file that looks complete, and the output
    may be the input file itself. lines=True writes JSONL whatever the name (None: by the name).

    append=True instead adds JSONL lines to the end of PATH itself (created if need be) and keeps what was
    written even when the block fails: for outputs that a killed run resumes (eval/generate.py's answers);
    `sync()` makes the lines so far durable.
    """

    def __init__(self, path: str | os.PathLike, lines: bool | None = None, append: bool = False):
        self.path = os.fspath(path)
        self.append = append
        self.as_array = not (append or lines or (lines is None and self.path.endswith(".jsonl")))
        self.count = 0
        self._tmp = self.path if append else self.path + ".tmp"
        self._f = None

    def __enter__(self) -> "RecordWriter":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f = open(self._tmp, "a" if self.append else "w", encoding="utf-8")
        if self.as_array:
            self._f.write("[")
        return self

    def sync(self) -> None:
        """Flush what was written to the disk (os.fsync), so a crash after this call cannot lose it."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def write(self, record: dict) -> None:
        self.write_line(record_line(record))

    def write_line(self, text: str) -> None:
        """Write one record already serialised as single-line JSON."""
        if self.as_array:
            self._f.write(",\n" if self.count else "\n")
        self._f.write(text)
        if not self.as_array:
            self._f.write("\n")
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.append:
            self._f.close()
        elif exc_type is None:
            if self.as_array:
                self._f.write("\n]\n" if self.count else "]\n")
            self._f.close()
            os.replace(self._tmp, self.path)
        else:
            self._f.close()
            os.remove(self._tmp)
