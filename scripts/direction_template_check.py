#!/usr/bin/env python3
"""Thin wrapper: `python scripts/direction_template_check.py ARGS` == `python -m refusal_lens.checks.direction_template ARGS` (see that module)."""
import sys

from refusal_lens.checks.direction_template import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
