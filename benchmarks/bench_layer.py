"""GraceMoE vs DeepSpeed's MOELayer: forward time of one MoE layer on local gloo ranks.

Shape legend: T tokens per rank, D hidden, E experts, K top-k.

Both layers share the gate weights, so their routing is equal; GraceMoE is converted from the
DeepSpeed layer (its experts moved to a plan: DeepSpeed's contiguous placement plus one replica
slot per rank for the hottest experts). Variants: DeepSpeed lossless (drop_tokens=False),
DeepSpeed lossy (capacity factor 1.0, its default), GRACE hierarchical and GRACE flat. Each
forward is timed from a barrier to the slowest rank's finish, variants interleaved; the median is
reported with the DeepSpeed-lossless / variant ratio (> 1: faster than DeepSpeed) and the bytes
sent across nodes per forward (all ranks).

    python benchmarks/bench_layer.py [--tokens 128 1024] [--nodes 2 --gpus-per-node 2]

Local ranks share this machine's cores and loopback, so cross-node links are not slower here than
in-node ones; the byte counts show what a real cluster would carry.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.comm.schedule import cross_node_mask, fixed_rows
from ds_grace.files import write_text_atomic
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.planning.plan import LayerPlan
from ds_grace.topology import Topology

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _deepspeed_layer(args: argparse.Namespace, *, drop_tokens: bool, rank: int) -> MoE:
    hidden = args.hidden
    expert = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
    moe = MoE(
        hidden,
        expert,
        num_experts=args.experts,
        ep_size=args.nodes * args.gpus_per_node,
        k=args.k,
        drop_tokens=drop_tokens,
        use_rts=False,
        top2_2nd_expert_sampling=False,
        min_capacity=0,
        eval_capacity_factor=1.0,
    ).eval()
    with torch.no_grad():
        gate_gen = torch.Generator().manual_seed(args.seed)
        # a skewed gate (some experts favoured), the same on every rank
        bias = torch.linspace(1.5, 0.0, args.experts).unsqueeze(1) / hidden**0.5
        moe.deepspeed_moe.gate.wg.weight.copy_(
            torch.randn(args.experts, hidden, generator=gate_gen) / hidden**0.5 + bias
        )
        expert_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        for param in moe.deepspeed_moe.experts.parameters():
            param.copy_(torch.randn(param.shape, generator=expert_gen) / hidden**0.5)
    moe.set_deepspeed_parallelism()
    return moe


def replicated_contiguous_plan(loads_E: list[int], topology: Topology) -> LayerPlan:
    """DeepSpeed's contiguous placement plus one replica slot per rank, hottest experts first.

    Each replica goes to the least-loaded rank not hosting that expert; WRR weights are the
    inverse of the hosting rank's predicted load (an expert's load split evenly over instances).
    """
    num_experts, num_ranks = len(loads_E), topology.world_size
    per_rank = num_experts // num_ranks
    slots = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(num_ranks)]
    hottest = sorted(range(num_experts), key=lambda e: -loads_E[e])[:num_ranks]
    instances = {e: [e // per_rank] for e in range(num_experts)}
    for e in hottest:

        def predicted(rank: int) -> float:
            return sum(loads_E[x] / len(instances[x]) for x in slots[rank])

        free = [r for r in range(num_ranks) if e not in slots[r] and len(slots[r]) == per_rank]
        if not free:
            continue
        target = min(free, key=predicted)
        slots[target].append(e)
        instances[e].append(target)
    rank_load = [sum(loads_E[x] / len(instances[x]) for x in slots[r]) for r in range(num_ranks)]
    weights = [[1.0 / max(rank_load[r], 1e-9)] * len(slots[r]) for r in range(num_ranks)]
    return LayerPlan.from_lists(
        slots=slots, primary=[e // per_rank for e in range(num_experts)], slot_weights=weights
    )


def _time_forwards(
    layers: dict[str, nn.Module], x: torch.Tensor, *, warmup: int, iters: int
) -> dict[str, list[float]]:
    """Seconds per forward of each layer (slowest rank), variants interleaved so load drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(warmup + iters):
        for name, layer in layers.items():
            dist.barrier()
            start = time.perf_counter()
            layer(x)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times[name].append(float(elapsed))
    return times


def _deepspeed_cross_node_bytes(moe: MoE, x_TD: torch.Tensor, topology: Topology, rank: int) -> int:
    """Bytes one rank sends across nodes in DeepSpeed's two all-to-alls (E x capacity x D buffers: the
    padded all-to-all's fixed rows per peer, ``schedule.fixed_rows``)."""
    gate_out = moe.deepspeed_moe.gate(x_TD, None, True)
    capacity = int(gate_out[1])
    (rows_RR,) = fixed_rows(moe.num_local_experts * capacity, topology=topology, origin=rank)
    cross_rows = int(rows_RR[rank, cross_node_mask(topology)[rank]].sum())
    return 2 * cross_rows * x_TD.shape[1] * x_TD.element_size()


def _bench_rank(ctx: RankContext, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(ctx.rank)
    topology = ctx.topology
    lossless = _deepspeed_layer(args, drop_tokens=False, rank=ctx.rank)
    lossy = _deepspeed_layer(args, drop_tokens=True, rank=ctx.rank)
    with torch.no_grad():
        lossy.load_state_dict(lossless.state_dict())
        calibration = torch.randn(1024, args.hidden, generator=torch.Generator().manual_seed(99 + ctx.rank))
        loads = lossless.deepspeed_moe.gate(calibration, None, True)[-1].clone()
        dist.all_reduce(loads)
    plan = replicated_contiguous_plan(loads.tolist(), topology)
    variants: dict[str, nn.Module] = {"deepspeed_lossless": lossless, "deepspeed_lossy": lossy}
    for name, hierarchical in (("grace_hierarchical", True), ("grace_flat", False)):
        variants[name] = GraceMoE.from_deepspeed(
            lossless,
            layer_plan=plan,
            topology=topology,
            options=RuntimeOptions(path="hierarchical" if hierarchical else "flat"),
        ).eval()
    out: dict[str, Any] = {"plan": plan.to_dict(), "loads": loads.tolist(), "runs": {}}
    for tokens in args.tokens:
        x = torch.randn(
            tokens, args.hidden, generator=torch.Generator().manual_seed(1000 * tokens + ctx.rank)
        )
        run: dict[str, Any] = {}
        with torch.no_grad():
            reference = lossless(x)[0]
            for name, layer in variants.items():
                y = layer(x)[0]
                if isinstance(layer, GraceMoE):
                    layer.comm_counters.reset()
                    layer(x)
                    cross_node = layer.comm_counters.total().bytes_sent_inter
                else:
                    cross_node = _deepspeed_cross_node_bytes(layer, x, topology, ctx.rank)
                run[name] = {
                    "max_abs_diff_vs_lossless": float((y - reference).abs().max()),
                    "cross_node_bytes_sent": cross_node,
                }
            for name, times in _time_forwards(variants, x, warmup=args.warmup, iters=args.iters).items():
                run[name]["times_s"] = times
        out["runs"][tokens] = run
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024], help="tokens per rank")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "bench_layer.json")
    args = parser.parse_args(argv)
    topology = Topology(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    if args.experts % topology.world_size:
        parser.error(
            f"--experts ({args.experts}) must be a multiple of the world size ({topology.world_size})"
        )
    started = time.time()
    per_rank = run_on_ranks(
        _bench_rank, topology=topology, args=(args,), timeout_s=1800, collective_timeout_s=300
    )
    result = per_rank[0]
    summary = []
    print(
        f"MoE layer forward on {topology} local gloo ranks, E={args.experts} k={args.k} D={args.hidden} "
        f"(median of {args.iters}, slowest rank)"
    )
    print(
        f"{'tokens/rank':>11} {'variant':>20} {'ms':>9} {'DS-lossless/x':>13} {'cross-node MB':>13} {'max|dy|':>9}"
    )
    for tokens, run in result["runs"].items():
        base = statistics.median(run["deepspeed_lossless"]["times_s"])
        for name, stats in run.items():
            median = statistics.median(stats["times_s"])
            cross_mb = sum(r["runs"][tokens][name]["cross_node_bytes_sent"] for r in per_rank) / 1e6
            row = {
                "tokens_per_rank": tokens,
                "variant": name,
                "median_ms": median * 1e3,
                "speedup_vs_deepspeed_lossless": base / median,
                "cross_node_mb_per_forward": cross_mb,
                "max_abs_diff_vs_lossless": max(
                    r["runs"][tokens][name]["max_abs_diff_vs_lossless"] for r in per_rank
                ),
            }
            summary.append(row)
            print(
                f"{tokens:>11} {name:>20} {row['median_ms']:>9.2f} {row['speedup_vs_deepspeed_lossless']:>13.2f} "
                f"{cross_mb:>13.3f} {row['max_abs_diff_vs_lossless']:>9.2e}"
            )
    for tokens in result["runs"]:
        ratios = {
            r["variant"]: r["speedup_vs_deepspeed_lossless"]
            for r in summary
            if r["tokens_per_rank"] == tokens
        }
        print(
            f"ratio DeepSpeed(lossless)/GRACE at {tokens} tokens/rank: hierarchical "
            f"{ratios['grace_hierarchical']:.2f}, flat {ratios['grace_flat']:.2f}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        args.output,
        json.dumps(
            {
                "benchmark": "bench_layer",
                "topology": {"num_nodes": args.nodes, "gpus_per_node": args.gpus_per_node},
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "environment": {
                    "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "backend": "gloo (CPU)",
                },
                "wall_s": time.time() - started,
                "summary": summary,
                "per_rank": per_rank,
            },
            indent=1,
        ),
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
