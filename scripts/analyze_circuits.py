#!/usr/bin/env python3
"""Thin wrapper: `python scripts/analyze_circuits.py --config configs/....yaml` == `refusal-lens analyze --config ...`."""
import sys

from refusal_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["analyze", *sys.argv[1:]]))
