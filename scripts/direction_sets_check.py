#!/usr/bin/env python3
"""Thin wrapper: `python scripts/direction_sets_check.py ARGS` == `python -m refusal_lens.checks.direction_sets ARGS` (see that module)."""
import sys

from refusal_lens.checks.direction_sets import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
