"""Small fixture-file writers the evaluation tests share (each returns the path as a string, as the scorers take)."""

from __future__ import annotations

import json


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
