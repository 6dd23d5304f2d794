#!/usr/bin/env python
"""Thin wrapper: `python data_prep/llava_instruct.py ARGS` runs `milora-prep-llava ARGS`,
the tool in milora_vlm/cli/prep_llava.py.

It imports the installed package (`pip install -e .` from this checkout); --help shows the usage."""

import sys

from milora_vlm.cli.prep_llava import main  # noqa: F401  (tests load this file and call main)

if __name__ == "__main__":
    sys.exit(main())
