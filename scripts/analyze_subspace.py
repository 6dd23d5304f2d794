#!/usr/bin/env python
"""Thin wrapper: `python scripts/analyze_subspace.py ARGS` runs `milora-analyze ARGS`,
the tool in milora_vlm/cli/analyze_subspace.py.

It imports the installed package (`pip install -e .` from this checkout); --help shows the usage."""

from milora_vlm.cli.analyze_subspace import main  # noqa: F401  (tests load this file and call main)

if __name__ == "__main__":
    main()
