"""Several profiles at once: one per-token trace that stands for a weighted mix of traffic kinds (pure).

Shape legend: L layers, T tokens, K top-k.

Rule (``mix_traces``): every profile gets a share of the mixed trace's tokens proportional to its weight
(default: equal), whatever its own size; its tokens are taken evenly spaced in recorded order (a
larger profile is thinned, a smaller one repeats rows), and the profiles are interleaved by their
relative position in their own recording, so that "recent" (robust planning's recency weighting)
means recent in every profile. Co-activation counts then add over profiles: a pair of experts
co-activated in several profiles weighs that many times more than a pair seen in one. The held-out
numbers that chose equal shares over pooling the tokens as recorded: benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ds_grace.trace import RoutingTrace, TraceError


def mix_traces(traces: Sequence[RoutingTrace], *, weights: Sequence[float] | None = None) -> RoutingTrace:
    """The weighted mix of per-token `traces` (module doc); every layer has the largest profile's token
    count, split by weight."""
    if len(traces) < 1:
        raise TraceError("mix_traces needs at least one trace")
    for i, trace in enumerate(traces):
        if not isinstance(trace, RoutingTrace):
            raise TraceError(f"trace {i} holds loads only; mixing profiles needs per-token traces")
        if (trace.num_layers, trace.num_experts, trace.top_k) != (
            traces[0].num_layers,
            traces[0].num_experts,
            traces[0].top_k,
        ):
            raise TraceError(
                f"trace {i} ({trace.num_layers} layers x {trace.num_experts} experts, top-{trace.top_k}) must "
                f"match trace 0 ({traces[0].num_layers} x {traces[0].num_experts}, top-{traces[0].top_k})"
            )
    shares = np.ones(len(traces)) if weights is None else np.asarray(weights, dtype=np.float64)
    if shares.shape != (len(traces),) or not np.all(np.isfinite(shares)) or np.any(shares <= 0):
        raise TraceError(
            f"--trace-weights ({list(weights) if weights is not None else None}) must be {len(traces)} "
            "finite numbers > 0, one per --trace"
        )
    shares = shares / shares.sum()
    layers = []
    for layer in range(traces[0].num_layers):
        total = max(len(trace.topk_ids[layer]) for trace in traces)
        ids, positions = [], []
        for share, trace in zip(shares, traces):
            rows = trace.topk_ids[layer]
            count = max(1, int(round(share * total)))
            picked = (np.arange(count) * len(rows)) // count
            ids.append(rows[picked])
            positions.append((np.arange(count) + 0.5) / count)
        order = np.argsort(np.concatenate(positions), kind="stable")
        layers.append(np.concatenate(ids)[order])
    return RoutingTrace(
        topk_ids=tuple(layers),
        num_experts=traces[0].num_experts,
        metadata={"mix": {"traces": len(traces), "weights": [float(w) for w in shares]}},
    )
