"""Code the tests share across folders: REPO (the repository root) and modules imported as `tests.helpers.x`
(importable because pytest puts the repository root on sys.path: pyproject's `pythonpath = ["."]`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
