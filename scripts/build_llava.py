#!/usr/bin/env python
"""Thin wrapper: `python scripts/build_llava.py ARGS` runs `milora-build-llava ARGS`,
the tool in milora_vlm/cli/build_llava.py.

It imports the installed package (`pip install -e .` from this checkout); --help shows the usage."""

import sys

from milora_vlm.cli.build_llava import main  # noqa: F401  (tests load this file and call main)

if __name__ == "__main__":
    sys.exit(main())
