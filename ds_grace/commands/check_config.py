"""`ds-grace check-config FILE`: validate a ds_config.json and print the resolved grace block."""

from __future__ import annotations

import argparse
import json
import sys

from ds_grace.config import GraceConfigError, load_ds_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="path to a ds_config.json")
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="expert-parallel world size to resolve and check the topology against",
    )


def run(args: argparse.Namespace) -> int:
    try:
        ds_config, grace = load_ds_config(args.config)
        resolved = grace.model_dump()
        if args.world_size is not None and grace.enabled:
            topo = grace.resolve_topology(world_size=args.world_size)
            resolved["topology"] = {"num_nodes": topo.num_nodes, "gpus_per_node": topo.gpus_per_node}
    except GraceConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"deepspeed": ds_config, "grace": resolved}, indent=2))
    return 0
