"""Parsing JSON that users bring: the one place where every way a JSON text can be hostile becomes a ValueError.

The standard library's parser accepts or crashes on several things a data, prediction, config or checkpoint file
can hold: nesting deep enough to raise RecursionError, `\\ud800`-style escapes that decode to lone surrogates
(strings that cannot be written back as UTF-8, so they crash a later step), duplicate keys (the last one silently
wins), and lines or files large enough to exhaust memory. `parse` and `read_file` turn each into a
`json.JSONDecodeError` / `InputFileError` naming the position; `iter_lines` reads JSONL with a bound per line.
Everything else is the standard `json` module.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, BinaryIO, Iterator

MAX_LINE_BYTES = 64 << 20  # one JSONL record / one JSON-array element: far beyond any real conversation
MAX_FILE_BYTES = 2 << 30  # a whole JSON document read at once (eval gold files, configs, manifests)

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # fast pre-check: pairs are legal, lone ones not
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
WHITESPACE = json.decoder.WHITESPACE  # what JSON allows between tokens (the standard library's own pattern)
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # a file starting so is UTF-16: every byte check below would fail on it


class InputFileError(ValueError):
    """A whole file (JSON, or a recipe's text) that cannot be used; the message names the file (and the line)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(dup)
    return obj


class _DuplicateKey(Exception):
    pass


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def raw_decode(text: str, idx: int = 0) -> tuple[Any, int]:
    """`json.JSONDecoder.raw_decode` at `idx`, with the hostile cases as `json.JSONDecodeError` (see the module)."""
    try:
        obj, end = _DECODER.raw_decode(text, idx)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, idx) from None
    except _DuplicateKey as e:
        raise json.JSONDecodeError(f"duplicate key {str(e.args[0])[:80]!r} in an object", text, idx) from None
    _check_surrogates(obj, text, idx, end)
    return obj, end


def parse(text: str) -> Any:
    """`json.loads(text)` for a str, with the hostile cases as `json.JSONDecodeError` (see the module)."""
    obj, end = raw_decode(text, WHITESPACE.match(text).end())
    end = WHITESPACE.match(text, end).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return obj


def _check_surrogates(obj: Any, text: str, start: int, end: int) -> None:
    """A string holding half of a surrogate pair (only a `\\uD8xx`-`\\uDFxx` escape can make one) is an error."""
    escape = _SURROGATE_ESCAPE.search(text, start, end)
    if escape is None:
        return
    stack = [obj]  # iterative: the object may be nested up to the parser's own limit
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            if _LONE_SURROGATE.search(o):
                raise json.JSONDecodeError("a \\u escape of a lone surrogate (not a character; not valid UTF-8)",
                                           text, escape.start())
        elif isinstance(o, dict):
            stack.extend(o)
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def reason(e: json.JSONDecodeError) -> str:
    """The error's message without the place (json's "Invalid control character at" expects one after it)."""
    return e.msg.removesuffix(" at")


def decode_error(e: json.JSONDecodeError, line: bool = True) -> str:
    """'<message> at line L column C' (line=False: '... at column C', for one line of a JSONL file)."""
    return f"{reason(e)} at {f'line {e.lineno} ' if line else ''}column {e.colno}"


def read_utf8(path: str | os.PathLike, what: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The text of a file a user brings (JSON, or a YAML recipe), read with a size bound and decoded as UTF-8 (a
    byte-order mark allowed); InputFileError naming the file, the byte and the line otherwise."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise InputFileError(f"{path}: the {what} is larger than {max_bytes >> 20} MiB; not read")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        hint = " (it looks like UTF-16: re-save it as UTF-8)" if data[:2] in UTF16_BOMS else ""
        raise InputFileError(f"{path}: the {what} is not UTF-8: byte 0x{data[e.start]:02x} on line {line}{hint}") from None


def read_file(path: str | os.PathLike, what: str = "JSON file", max_bytes: int = MAX_FILE_BYTES) -> Any:
    """The JSON document in `path`. Anything that stops it being read (no such file, too large, not UTF-8,
    malformed or hostile JSON) is an InputFileError naming the file and the place."""
    text = read_utf8(path, what, max_bytes)
    try:
        return parse(text)
    except json.JSONDecodeError as e:
        raise InputFileError(f"{os.fspath(path)}: malformed {what}: {decode_error(e)}") from None


def read_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """`read_file` for a file that must hold one JSON object."""
    obj = read_file(path, what)
    if not isinstance(obj, dict):
        raise InputFileError(f"{os.fspath(path)}: the {what} must hold a JSON object, not a {type(obj).__name__}")
    return obj


def iter_lines(f: BinaryIO, max_bytes: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(line_no, raw line) for each line of a binary file; a line longer than `max_bytes` (MAX_LINE_BYTES) is read
    past in bounded chunks and yielded as (line_no, None), so one huge line costs its record, not the memory."""
    max_bytes = MAX_LINE_BYTES if max_bytes is None else max_bytes
    line_no = 0
    while True:
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) <= max_bytes or raw.endswith(b"\n"):
            yield line_no, raw
            continue
        while raw and not raw.endswith(b"\n"):  # the rest of the over-long line
            raw = f.readline(1 << 20)
        yield line_no, None
