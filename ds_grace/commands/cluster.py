"""`ds-grace cluster`: run a script on an emulated multi-node cluster (or on plain local ranks).

A thin wrapper around the repository's launch/emulated_cluster.py, which also runs on its own:
`ds-grace cluster --nodes 2 --ranks-per-node 2 --rate-mbit 50 -- SCRIPT ARGS...`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

LAUNCH_DIR = Path(__file__).resolve().parents[2] / "launch"


def load_tool() -> ModuleType:
    """Import launch/emulated_cluster.py (a script directory next to the ds_grace package)."""
    if not (LAUNCH_DIR / "emulated_cluster.py").is_file():
        raise FileNotFoundError(
            f"`ds-grace cluster` needs the repository's launch/ directory; "
            f"{LAUNCH_DIR / 'emulated_cluster.py'} does not exist"
        )
    if str(LAUNCH_DIR) not in sys.path:
        sys.path.insert(0, str(LAUNCH_DIR))
    return importlib.import_module("emulated_cluster")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load_tool().add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return int(load_tool().run_from_args(args))
