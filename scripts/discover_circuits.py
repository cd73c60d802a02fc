#!/usr/bin/env python3
"""Thin wrapper: `python scripts/discover_circuits.py --config configs/....yaml` == `refusal-lens discover --config ...`."""
import sys

from refusal_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["discover", *sys.argv[1:]]))
