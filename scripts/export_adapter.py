#!/usr/bin/env python
"""Thin wrapper: `python scripts/export_adapter.py ARGS` runs `milora-export ARGS`,
the tool in milora_vlm/cli/export_adapter.py.

It imports the installed package (`pip install -e .` from this checkout); --help shows the usage."""

from milora_vlm.cli.export_adapter import main  # noqa: F401  (tests load this file and call main)

if __name__ == "__main__":
    main()
