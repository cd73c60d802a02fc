#!/usr/bin/env python3
"""Thin wrapper: `python scripts/collect_activations.py --config configs/....yaml` == `refusal-lens collect --config ...`."""
import sys

from refusal_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["collect", *sys.argv[1:]]))
