"""The runtime's own overhead per MoE layer forward, in one process (a world of 1).

    python benchmarks/bench_overhead.py [--output benchmarks/results/bench_overhead.json] [--repeats 200]

--repeats: sampling rounds (every system once per round, in a shuffled order) at up to 64 tokens,
scaled down by tokens / 64 above (at least 3); a forward of a few tokens takes a few ms here and this
CPU's timings of one vary by tens of percent, so the small sizes take many rounds.

For 4, 16, 64, 512 and 4096 tokens: the time of GraceMoE.forward_routed on each path (flat; the
low-latency path where the tokens fit its bound) against a minimal reference on the same routing
(sort the routes by expert, run each expert once on its rows, unsort and add with the gate weights)
and against DeepSpeed's MOELayer (lossless, its own gate included), with the runtime's host reads
and non-view aten ops (the experts' own excluded; ``benchmarks/counting.py``). Rows: path, tokens,
host_reads, aten_ops, ms, reference_ms, deepspeed_ms (medians). On one rank every path's rounds are
local copies, so this is the index work and bookkeeping a forward adds around the experts.

Every row also carries static_grouped_ms: the same routing computed the minimal way with the experts'
weights stacked (rows sorted by expert with argsort, one grouped GEMM per matrix, ``torch._grouped_mm``
with the group ends on the device, weighted sum by index_add; no host read, no data-dependent shape).
The runtime runs its slots that way too (ds_grace.moe.grouped): this column is its own expert kernel
with no dispatch around it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.counting import count_hot_path
from ds_grace.files import write_text_atomic
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.planning.plan import LayerPlan
from ds_grace.topology import Topology

TOKENS = (4, 16, 64, 512, 4096)
NUM_EXPERTS, TOP_K, HIDDEN, FFN = 8, 2, 256, 512
LOW_LATENCY_MAX_TOKENS = 64


def make_experts() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN)).eval()
        for _ in range(NUM_EXPERTS)
    ]


def reference_forward(
    experts: list[nn.Module], x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    """Gate output -> sort by expert -> experts -> unsort and weighted sum."""
    order_Q = torch.argsort(ids_TK.reshape(-1), stable=True)
    token_Q = order_Q // ids_TK.shape[1]
    rows_E = torch.bincount(ids_TK.reshape(-1), minlength=len(experts)).tolist()
    x_QD = x_TD.index_select(0, token_Q)
    out_QD = torch.cat([expert(x) for expert, x in zip(experts, x_QD.split(rows_E))])
    weighted_QD = out_QD * w_TK.reshape(-1)[order_Q].unsqueeze(1)
    return torch.zeros_like(x_TD).index_add_(0, token_Q, weighted_QD)


def stacked_weights(experts: list[nn.Module]) -> tuple[torch.Tensor, ...]:
    """(w1_EDF, b1_EF, w2_EFD, b2_ED): the experts' two Linear layers stacked, input-major."""
    return (
        torch.stack([e[0].weight.t() for e in experts]).contiguous(),
        torch.stack([e[0].bias for e in experts]),
        torch.stack([e[2].weight.t() for e in experts]).contiguous(),
        torch.stack([e[2].bias for e in experts]),
    )


def static_grouped_forward(
    weights: tuple[torch.Tensor, ...], x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    """Static shapes: routes sorted by expert, one grouped GEMM per matrix, weighted sum (no host read)."""
    w1_EDF, b1_EF, w2_EFD, b2_ED = weights
    expert_Q = ids_TK.reshape(-1)
    order_Q = torch.argsort(expert_Q, stable=True)
    ones_Q = torch.ones_like(expert_Q, dtype=torch.int32)
    ends_E = torch.zeros(w1_EDF.shape[0], dtype=torch.int32).index_add_(0, expert_Q, ones_Q).cumsum(0)
    ends_E = ends_E.to(torch.int32)
    token_Q, sorted_Q = order_Q // ids_TK.shape[1], expert_Q[order_Q]
    h_QF = torch._grouped_mm(x_TD.index_select(0, token_Q), w1_EDF, offs=ends_E) + b1_EF[sorted_Q]
    y_QD = torch._grouped_mm(F.gelu(h_QF), w2_EFD, offs=ends_E) + b2_ED[sorted_Q]
    return torch.zeros_like(x_TD).index_add_(0, token_Q, y_QD * w_TK.reshape(-1)[order_Q].unsqueeze(1))


def deepspeed_layer(experts: list[nn.Module]) -> nn.Module:
    from deepspeed.moe.layer import MoE

    layer = MoE(
        hidden_size=HIDDEN, expert=experts[0], num_experts=NUM_EXPERTS, ep_size=1, k=TOP_K, drop_tokens=False
    )
    with torch.no_grad():
        for mine, theirs in zip(layer.deepspeed_moe.experts.deepspeed_experts, experts):
            mine.load_state_dict(theirs.state_dict())
    return layer.eval()


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, *, seed: int) -> dict[str, float]:
    """Median ms of each fn, sampled in rounds (each fn once per round, in a shuffled order)."""
    order = list(fns)
    shuffle = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(*, repeats: int) -> list[dict]:
    experts = make_experts()
    plan = LayerPlan.from_lists(slots=[list(range(NUM_EXPERTS))], primary=[0] * NUM_EXPERTS)
    options = RuntimeOptions(path="flat", low_latency_max_tokens=LOW_LATENCY_MAX_TOKENS)
    runtime = GraceMoE.from_experts(
        experts,
        hidden_size=HIDDEN,
        k=TOP_K,
        layer_plan=plan,
        topology=Topology(1, 1),
        ep_index=0,
        options=options,
    ).eval()
    slot_modules = list(runtime.deepspeed_moe.experts.deepspeed_experts)
    deepspeed = deepspeed_layer(experts)
    weights = stacked_weights(experts)
    rows = []
    with torch.no_grad():
        for tokens in TOKENS:
            generator = torch.Generator().manual_seed(tokens)
            x_TD = torch.randn(tokens, HIDDEN, generator=generator)
            w_TK, ids_TK = torch.rand(tokens, NUM_EXPERTS, generator=generator).softmax(1).topk(TOP_K, dim=1)
            inputs = (x_TD, ids_TK, w_TK)
            expected = reference_forward(experts, *inputs)
            fns = {
                "reference": lambda inputs=inputs: reference_forward(experts, *inputs),
                "deepspeed": lambda x_TD=x_TD: deepspeed(x_TD.unsqueeze(0)),
                "static_grouped": lambda inputs=inputs: static_grouped_forward(weights, *inputs),
            }
            paths = (
                {"flat": None, "low-latency": tokens} if tokens <= LOW_LATENCY_MAX_TOKENS else {"flat": None}
            )
            counts = {}
            for path, bound in paths.items():
                fns[path] = lambda inputs=inputs, bound=bound: runtime.forward_routed(
                    *inputs, low_latency_tokens=bound
                )
                torch.testing.assert_close(fns[path](), expected, rtol=1e-4, atol=1e-4)
                with count_hot_path(slot_modules) as counts[path]:
                    fns[path]()
            torch.testing.assert_close(fns["static_grouped"](), expected, rtol=1e-4, atol=1e-4)
            ms = interleaved_medians(fns, max(3, repeats * 64 // max(tokens, 64)), seed=tokens)
            for path in paths:
                rows.append({
                    "path": path, "tokens": tokens, "host_reads": counts[path].num_host_reads,
                    "aten_ops": counts[path].num_aten_ops, "ms": ms[path], "reference_ms": ms["reference"],
                    "deepspeed_ms": ms["deepspeed"], "static_grouped_ms": ms["static_grouped"],
                })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/bench_overhead.json")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(repeats=args.repeats)
    print(
        "| path | tokens | host reads | aten ops | runtime ms | reference ms | DeepSpeed ms | runtime / reference "
        "| static grouped GEMM ms | runtime / static grouped |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        grouped = row["static_grouped_ms"]
        print(f"| {row['path']} | {row['tokens']} | {row['host_reads']} | {row['aten_ops']} | {row['ms']:.3f} | "
              f"{row['reference_ms']:.3f} | {row['deepspeed_ms']:.3f} | {row['ms'] / row['reference_ms']:.2f} | "
              f"{grouped:.3f} | {row['ms'] / grouped:.2f} |")  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
