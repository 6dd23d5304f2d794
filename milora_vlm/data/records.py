"""Reading LLaVA-style conversation files and their images, with errors that name file, line and field.

Used by the data_prep validators and by the training dataset, so both judge a record the same way.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from PIL import Image, UnidentifiedImageError

from .templates import SkipSample


class RecordFileError(ValueError):
    """A conversation file that cannot be read at all (not one bad record: the whole file)."""


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield (line_or_index, record, error) for a .json (array) or .jsonl file.

    JSONL is streamed line by line; a malformed line yields (line_no, None, "malformed JSON: ...") instead of
    aborting, so callers count it. A .json file must hold one array; records are numbered from 1.
    Blank JSONL lines are skipped. A record that is not an object yields an error too.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise RecordFileError(f"{path}: no such file")
    if path.endswith(".jsonl"):
        with open(path, "r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield line_no, None, f"malformed JSON: {e.msg} at column {e.colno}"
                    continue
                if not isinstance(rec, dict):
                    yield line_no, None, f"record is a {type(rec).__name__}, not an object"
                    continue
                yield line_no, rec, None
        return
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise RecordFileError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise RecordFileError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for idx, rec in enumerate(data, start=1):
        if not isinstance(rec, dict):
            yield idx, None, f"record is a {type(rec).__name__}, not an object"
        else:
            yield idx, rec, None


def load_records(path: str | os.PathLike) -> tuple[list[dict], list[tuple[int, str]]]:
    """All readable records and the (line, error) list of unreadable ones."""
    good, bad = [], []
    for line_no, rec, err in iter_records(path):
        if err is None:
            good.append(rec)
        else:
            bad.append((line_no, err))
    return good, bad


def resolve_image_path(image: str, image_folder: str | os.PathLike | None) -> str:
    return image if os.path.isabs(image) or image_folder is None else os.path.join(image_folder, image)


def load_image(path: str) -> Image.Image:
    """Decode an image fully (truncated files fail here, not later in a worker) and return it as RGB.

    Raises SkipSample("missing_image" | "corrupt_image") naming the path.
    """
    if not os.path.isfile(path):
        raise SkipSample("missing_image", f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SkipSample("corrupt_image", f"cannot decode {path}: {e}") from None
