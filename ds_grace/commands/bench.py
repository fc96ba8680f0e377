"""`ds-grace bench`: GRACE's ablations vs vanilla DeepSpeed-MoE on the emulated multi-node cluster.

A thin wrapper around the repository's benchmarks/bench.py (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    """Import benchmarks/bench.py (a script directory next to the ds_grace package)."""
    if not (REPO_ROOT / "benchmarks" / "bench.py").is_file():
        raise FileNotFoundError(
            f"`ds-grace bench` needs the repository's benchmarks/ directory; {REPO_ROOT / 'benchmarks'} has no bench.py"
        )
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("benchmarks.bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load_bench().add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return int(load_bench().run_from_args(args))
