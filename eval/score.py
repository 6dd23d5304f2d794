#!/usr/bin/env python
"""Thin wrapper: `python eval/score.py ARGS` runs `milora-score ARGS`,
the tool in milora_vlm/cli/score.py.

It imports the installed package (`pip install -e .` from this checkout); --help shows the usage."""

import sys

from milora_vlm.cli.score import main  # noqa: F401  (tests load this file and call main)

if __name__ == "__main__":
    sys.exit(main())
