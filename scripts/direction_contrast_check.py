#!/usr/bin/env python3
"""Thin wrapper: `python scripts/direction_contrast_check.py ARGS` == `python -m refusal_lens.checks.direction_contrast ARGS` (see that module)."""
import sys

from refusal_lens.checks.direction_contrast import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
