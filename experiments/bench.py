#!/usr/bin/env python
"""Benchmark script: the same as ``glam3d bench`` (all its options), e.g.

    python experiments/bench.py --quick
    python experiments/bench.py --markdown experiments/bench_cpu.md --json experiments/bench_cpu.json
"""
import sys

from glam3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
