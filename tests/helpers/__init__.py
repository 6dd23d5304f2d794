"""Code the tests share across folders: REPO (the repository root), load_script, and modules imported as
`tests.helpers.x` (importable because pytest puts the repository root on sys.path: pyproject's `pythonpath = ["."]`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_script(path: str | Path, name: str) -> ModuleType:
    """Import a tool file as module `name`: data_prep/, eval/ and scripts/ are folders, not packages."""
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
