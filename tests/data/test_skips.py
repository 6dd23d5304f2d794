"""The one table of skip reasons: every reason the code can raise is in it, and nothing else is accepted."""

from __future__ import annotations

import ast

import pytest

from milora_vlm.data.skips import NOTES, REASONS, REPAIRS, SkipRecord, SkipSample
from milora_vlm.data.validation import DROPPED, REPAIRED, Issue
from tests.helpers import REPO

SOURCES = [p for d in ("milora_vlm", "data_prep", "eval", "scripts") for p in sorted((REPO / d).rglob("*.py"))]
# Helpers that build a reason from the field they were asked for: SkipSample(f"bad_{name}") (the format converters)
FIELD_HELPERS = {"text_field", "_int_field"}


def _calls(tree: ast.AST, names: set[str]):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in names:
                yield node


def _literals(node: ast.expr) -> list[str]:
    """The reasons a literal argument can take: a string, or either arm of `a if cond else b`. f-strings
    (f"bad_{name}") come from the field helpers, checked by the names passed to them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _literals(node.body) + _literals(node.orelse)
    return []


def _raised_reasons() -> dict[str, list[str]]:
    """reason -> places, for every literal reason given to SkipSample / Issue / report.drop / repair and every
    field named to a field helper, across the package and its scripts."""
    found: dict[str, list[str]] = {}
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree, {"SkipSample", "SkipRecord", "drop", "repair", "Issue"}):
            args = call.args[1:] if getattr(call.func, "id", None) == "Issue" else call.args
            if not args:
                continue
            for reason in _literals(args[0]):
                found.setdefault(reason, []).append(f"{path.relative_to(REPO)}:{call.lineno}")
        for call in _calls(tree, FIELD_HELPERS):
            if len(call.args) >= 2 and isinstance(call.args[1], ast.Constant):
                found.setdefault(f"bad_{call.args[1].value}", []).append(f"{path.relative_to(REPO)}:{call.lineno}")
    return found


def test_every_reason_raised_in_the_code_is_in_the_one_table():
    found = _raised_reasons()
    assert len(found) > 30  # the scan sees the call sites (a broken scan would pass vacuously)
    table = set(REASONS) | set(REPAIRS) | set(NOTES)
    missing = {reason: where for reason, where in found.items() if reason not in table}
    assert not missing, f"reasons raised but not in milora_vlm.data.skips: {missing}"


def test_every_table_entry_is_used_and_has_a_meaning():
    found = _raised_reasons()
    # read_error_reason returns these three (not through a literal SkipSample call)
    unused = set(REASONS) - set(found) - {"malformed_json", "not_an_object", "not_utf8"}
    assert not unused, f"reasons in the table that nothing raises: {sorted(unused)}"
    for table in (REASONS, REPAIRS, NOTES):
        assert all(isinstance(m, str) and m.strip() and "\n" not in m for m in table.values())


def test_an_unregistered_reason_is_refused_everywhere():
    with pytest.raises(ValueError, match="unregistered skip reason 'bad_nmae'"):
        SkipSample("bad_nmae", "typo")
    with pytest.raises(ValueError, match="unregistered"):
        SkipRecord("answer_truncatd", "d", "f:line 1")
    with pytest.raises(ValueError, match="unregistered"):
        Issue(DROPPED, "missing_id", "a repair is not a drop reason")
    with pytest.raises(ValueError, match="unregistered"):
        Issue(REPAIRED, "too_long", "a drop reason is not a repair")
    assert SkipSample("too_long", "9 > 8").reason == "too_long"
    assert SkipRecord("answer_truncated", "d", "f:line 1").reason in NOTES
