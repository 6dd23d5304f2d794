#!/usr/bin/env python
"""Thin wrapper: `python data_prep/easy_vqa.py ARGS` runs `milora-prep-easyvqa ARGS`,
the tool in milora_vlm/cli/prep_easyvqa.py.

It imports the installed package (`pip install -e .` from this checkout); --help shows the usage."""

import os
import sys

# Run as a script, this file's folder comes first on sys.path, where this file would shadow the `easy_vqa`
# package the converter reads; drop the folder (nothing is imported from it).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from milora_vlm.cli.prep_easyvqa import main  # noqa: E402,F401  (tests load this file and call main)

if __name__ == "__main__":
    main()
