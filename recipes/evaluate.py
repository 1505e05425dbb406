"""Evaluate a trained run: per-negative-type ranking accuracy, energy gaps, policy vs rerank vs refine L1.

    python recipes/evaluate.py runs/demo [--split val --max_samples 256]   # same as `vla-energy evaluate`
"""

import sys

from vla_energy.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
