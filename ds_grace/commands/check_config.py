"""`ds-grace check-config FILE`: run the checks init_inference runs before any collective, print the result.

The checks are ds_grace.preflight.preflight, the very function init_inference calls: the DeepSpeed part,
the grace block, the topology for the world size, the plan or trace file the config names (or --plan),
moe.ep_size; with --model, ds_grace.inference.check_before_start (init_inference's own): the checkpoint
folder opened as a skeleton (headers only), the plan against the model and the checkpoint's expert
tensors, as rank 0 runs them. The world size
is --world-size, else the launcher's WORLD_SIZE, else num_nodes x gpus_per_node when the config (or --nodes and
--gpus-per-node, which override grace.topology as for launch/generate.py) fixes both, else 1; the output says
which.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

from ds_grace.config import GraceConfig, GraceConfigError, load_ds_config, parse_grace_block


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"({text!r}) must be an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"({value}) must be an integer >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="path to a ds_config.json")
    parser.add_argument(
        "--world-size",
        type=_positive_int,
        default=None,
        help="expert-parallel world size to check for (default: WORLD_SIZE, else the config's topology, else 1)",
    )
    parser.add_argument("--plan", default=None, help="override grace.plan.path, as launch/generate.py --plan")
    parser.add_argument("--model", default=None, help="checkpoint folder: also check the model and the plan")
    parser.add_argument(
        "--nodes", type=_positive_int, default=None, help="override grace.topology.num_nodes (as generate.py)"
    )
    parser.add_argument(
        "--gpus-per-node",
        type=_positive_int,
        default=None,
        help="override grace.topology.gpus_per_node (as generate.py)",
    )


def _world_size(args: argparse.Namespace, grace: GraceConfig) -> tuple[int, str]:
    if args.world_size is not None:
        return args.world_size, "--world-size"
    if "WORLD_SIZE" in os.environ:
        from ds_grace.preflight import world_from_env

        return world_from_env()[0], "WORLD_SIZE"
    nodes, gpus = grace.topology.num_nodes, grace.topology.gpus_per_node
    if isinstance(nodes, int) and isinstance(gpus, int):
        return nodes * gpus, "grace.topology"
    return 1, "default"


def _with_topology(grace: GraceConfig, *, nodes: int | None, gpus_per_node: int | None) -> GraceConfig:
    """grace with --nodes / --gpus-per-node in its topology (validated as the config's own fields)."""
    if nodes is None and gpus_per_node is None:
        return grace
    if not grace.enabled:
        raise GraceConfigError(
            "--nodes / --gpus-per-node set grace.topology: the ds_config has no enabled grace block"
        )
    block = grace.model_dump()
    block["topology"] = {
        "num_nodes": nodes if nodes is not None else block["topology"]["num_nodes"],
        "gpus_per_node": gpus_per_node if gpus_per_node is not None else block["topology"]["gpus_per_node"],
    }
    return parse_grace_block(block)


def run(args: argparse.Namespace) -> int:
    from ds_grace.preflight import preflight

    ds_config, grace = load_ds_config(args.config)
    if args.plan is not None:
        if not grace.enabled:
            raise GraceConfigError(f"--plan ({args.plan}) needs a ds_config with an enabled grace block")
        grace = grace.model_copy(update={"plan": grace.plan.model_copy(update={"path": args.plan})})
    grace = _with_topology(grace, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    world_size, source = _world_size(args, grace)
    # stdout carries only the JSON report: DeepSpeed's and transformers' notices go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        if args.model is None:
            checked = preflight(ds_config, grace, world_size=world_size, rank=0)
        else:
            from ds_grace.inference import check_before_start

            start = check_before_start(args.model, ds_config, grace, world_size=world_size, rank=0)
            checked = start.checked
    resolved = grace.model_dump()
    resolved["topology"] = {
        "num_nodes": checked.topology.num_nodes,
        "gpus_per_node": checked.topology.gpus_per_node,
    }
    report: dict[str, Any] = {
        "deepspeed": checked.ds_config,
        "grace": resolved,
        "world_size": world_size,
        "world_size_from": source,
        "dtype": str(checked.dtype).removeprefix("torch."),
        "plan_content_hash": checked.plan.content_hash if checked.plan is not None else None,
        "model_checked": checked.moe is not None,
    }
    print(json.dumps(report, indent=2))
    return 0
