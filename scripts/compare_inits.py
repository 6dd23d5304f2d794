#!/usr/bin/env python
"""Thin wrapper: `python scripts/compare_inits.py ARGS` runs `milora-compare-inits ARGS`,
the tool in milora_vlm/cli/compare_inits.py.

It imports the installed package (`pip install -e .` from this checkout); --help shows the usage."""

from milora_vlm.cli.compare_inits import main  # noqa: F401  (tests load this file and call main)

if __name__ == "__main__":
    main()
