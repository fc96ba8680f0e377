"""`ds-grace bench`: GRACE's ablations vs vanilla DeepSpeed-MoE on the emulated multi-node cluster.

A thin wrapper around the benchmarks package (benchmarks/bench.py, installed with ds_grace; see
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType


class BenchmarksMissing(FileNotFoundError):
    """The benchmarks package is not installed next to ds_grace."""


def load_bench() -> ModuleType:
    """Import benchmarks.bench (installed with ds_grace, or the checkout's benchmarks/)."""
    try:
        return importlib.import_module("benchmarks.bench")
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.bench"):
            raise
        raise BenchmarksMissing(
            None,
            "the benchmarks package is not installed (it ships with ds_grace: reinstall with `pip install .`)",
            "benchmarks",
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load_bench().add_arguments(parser)


def in_checkout(bench: ModuleType) -> bool:
    """True when `bench` is a repository checkout's benchmarks/ (its setup.py one level up)."""
    return (Path(bench.__file__).resolve().parents[1] / "setup.py").is_file()


def run(args: argparse.Namespace) -> int:
    bench = load_bench()
    if not in_checkout(bench):
        print(
            "error: ds-grace bench rewrites a checkout's benchmarks/README.md and benchmarks/results; run it "
            "in a clone of the repository (outside one, `ds-grace demo --output FILE` runs the comparison)",
            file=sys.stderr,
        )
        return 2
    return int(bench.run_from_args(args))
