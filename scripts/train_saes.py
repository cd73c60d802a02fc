#!/usr/bin/env python3
"""Thin wrapper: `python scripts/train_saes.py --config configs/....yaml` == `refusal-lens train-saes --config ...`."""
import sys

from refusal_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train-saes", *sys.argv[1:]]))
