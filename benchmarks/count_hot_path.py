"""Host reads, non-view aten ops and collectives of one MoE layer forward, per path, on 4 gloo ranks (2x2).

    python benchmarks/count_hot_path.py [--output benchmarks/results/hot_path_counts.json]

Paths: flat, hierarchical, low-latency (every rank within the bound); phases: decode (4 tokens per
rank) and prefill (64 per rank). The experts' own ops are left out (``benchmarks/counting.py``).
Counted on rank 0, after one warm-up forward; every rank runs the same rounds.

The plan gives every rank one candidate per expert under TAR (each node holds each expert once), so
its instance choice is a lookup; the same plan under WRR, where replicated experts draw between their
copies on every rank, is counted too (``<path>/sampled``): the instance-choice sequence's ops.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.counting import count_hot_path
from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.commands.selfcheck import random_layer_plan
from ds_grace.files import write_text_atomic
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.topology import Topology

TOPOLOGY = Topology(2, 2)
NUM_EXPERTS, TOP_K, HIDDEN = 8, 2, 16
PHASES = {"decode": 4, "prefill": 64}
LOW_LATENCY_MAX_TOKENS = 64
PATHS = ("flat", "hierarchical", "low-latency")
CHOICES = {"": "tar", "/sampled": "wrr"}  # row-name suffix -> routing policy


def runtime_options(path: str, policy: str = "tar") -> RuntimeOptions:
    low_latency = LOW_LATENCY_MAX_TOKENS if path == "low-latency" else 0
    return RuntimeOptions(
        policy=policy, path="flat" if path == "flat" else "hierarchical", low_latency_max_tokens=low_latency
    )


def make_layer(path: str, rank: int, policy: str = "tar") -> tuple[GraceMoE, list[torch.nn.Module]]:
    plan = random_layer_plan(np.random.default_rng(7), num_experts=NUM_EXPERTS, topology=TOPOLOGY)
    generator = torch.Generator().manual_seed(11)
    experts = [torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(NUM_EXPERTS)]
    for expert in experts:
        with torch.no_grad():
            expert.weight.copy_(torch.randn(HIDDEN, HIDDEN, generator=generator))
    layer = GraceMoE.from_experts(
        experts, hidden_size=HIDDEN, k=TOP_K, layer_plan=plan, topology=TOPOLOGY, ep_index=rank,
        options=runtime_options(path, policy),
    )  # fmt: skip
    return layer.eval(), list(layer.deepspeed_moe.experts.deepspeed_experts)


def make_tokens(tokens: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + rank)
    x_TD = torch.randn(tokens, HIDDEN, generator=generator)
    w_TK, ids_TK = torch.rand(tokens, NUM_EXPERTS, generator=generator).topk(TOP_K, dim=1)
    return x_TD, ids_TK, w_TK


def forward(layer: GraceMoE, inputs: tuple[torch.Tensor, ...], path: str) -> torch.Tensor:
    if path == "low-latency" and "low_latency_tokens" in GraceMoE.forward_routed.__code__.co_varnames:
        return layer.forward_routed(*inputs, low_latency_tokens=inputs[0].shape[0])  # type: ignore[call-arg]
    return layer.forward_routed(*inputs)


def _count_rank(ctx: RankContext) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    with torch.no_grad():
        for path, (suffix, policy) in itertools.product(PATHS, CHOICES.items()):
            layer, experts = make_layer(path, ctx.rank, policy)
            out[path + suffix] = {}
            for phase, tokens in PHASES.items():
                inputs = make_tokens(tokens, ctx.rank)
                forward(layer, inputs, path)  # warm-up (and the low-latency bound's first forward)
                with count_hot_path(experts) as counts:
                    forward(layer, inputs, path)
                out[path + suffix][phase] = {**counts.as_dict(), "path_taken": layer.deepspeed_moe.last_path}
    return out


def measure() -> dict[str, dict[str, dict]]:
    """Counts per path and phase, on rank 0 of 4 gloo ranks as 2x2."""
    return run_on_ranks(_count_rank, topology=TOPOLOGY, timeout_s=600, collective_timeout_s=120)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/hot_path_counts.json")
    args = parser.parse_args(argv)
    counts = measure()
    for path, phases in counts.items():
        for phase, row in phases.items():
            print(f"{path:21s} {phase:8s} host reads {row['host_reads']:3d} aten ops {row['aten_ops']:4d} "
                  f"collectives {row['collectives']:2d} {row['host_reads_by_kind']}")  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(counts, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
