#!/usr/bin/env python3
"""Thin wrapper: `python scripts/rerun_circuit.py ARGS` == `python -m refusal_lens.checks.rerun_circuit ARGS` (see that module)."""
import sys

from refusal_lens.checks.rerun_circuit import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
