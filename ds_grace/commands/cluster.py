"""`ds-grace cluster`: run a script on an emulated multi-node cluster (or on plain local ranks).

A thin wrapper around ds_grace/cluster/emulated_cluster.py, which also runs as
`python -m ds_grace.cluster.emulated_cluster`:
`ds-grace cluster --nodes 2 --ranks-per-node 2 --rate-mbit 50 -- SCRIPT ARGS...`.
"""

from __future__ import annotations

import argparse
from types import ModuleType


def load_tool() -> ModuleType:
    """The emulated-cluster tool (imported on use: it is only needed by the commands that launch ranks)."""
    from ds_grace.cluster import emulated_cluster

    return emulated_cluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load_tool().add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return int(load_tool().run_from_args(args))
