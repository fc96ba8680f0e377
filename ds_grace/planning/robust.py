"""Planning from a sample: plans that hold on traffic the trace did not record.

Shape legend: L layers, E experts.

A trace is a sample, and served traffic drifts from it (the Qwen1.5 route logs: prefill, then decode).
Fitted exactly, a plan balances the sample and loses it on what follows. So with equal slots per GPU
(``ROBUST_VARIANT``) the grace planner plans a drifting layer (``drift_ratio`` > 2) on its recent
loads, shrinks every layer's loads toward their mean by how little the sample predicts itself, keeps
replica room on every GPU and spreads a node's co-activated experts over its GPUs (their loads rise
together), then, on drifting layers, swaps replicas toward locality at a small balance cost.
The numbers that chose each step, and the variants measured and not adopted (their code:
benchmarks/planner_variants.py): benchmarks/README.md, "The robust planner: what was measured".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ds_grace.trace import RoutingTrace, split_trace

MIN_TOKENS_TO_SPLIT = 64  # shrinkage needs both halves of a layer to hold this many tokens


@dataclass(frozen=True)
class Variant:
    """Which steps of the grace planner apply (planning/build.py applies them).

    shrunk_loads: plan on ``shrunk_loads``; replica_room: primaries per GPU capped at ceil(E / GPUs)
    (every GPU keeps S - ceil(E / GPUs) slots for replicas) instead of S; spread:
    ``spread_within_nodes`` after grouping; recency: plan on ``recent_loads`` with that half-life, on
    the layers whose ``drift_ratio`` exceeds recency_gate (None: every layer); swap_tolerance:
    ``locality_swaps`` on those layers, the max GPU load allowed to rise by that fraction of the mean.
    """

    shrunk_loads: bool = False
    replica_room: bool = False
    spread: bool = False
    recency: float | None = None
    recency_gate: float | None = None
    swap_tolerance: float | None = None


RECENCY_HALF_LIFE = 0.5  # of the sample's tokens
RECENCY_GATE = 2.0  # drift_ratio above which a layer's loads are the recent ones
SWAP_TOLERANCE = 0.02  # of the mean GPU load: what a locality swap may add to the max
SAMPLE_FITTED = Variant()
ROBUST_VARIANT = Variant(
    shrunk_loads=True,
    replica_room=True,
    spread=True,
    recency=RECENCY_HALF_LIFE,
    recency_gate=RECENCY_GATE,
    swap_tolerance=SWAP_TOLERANCE,
)


def _halves(trace: RoutingTrace) -> tuple[RoutingTrace, RoutingTrace] | None:
    if min(trace.num_tokens) < 2 * MIN_TOKENS_TO_SPLIT:
        return None
    return split_trace(trace, fraction=0.5)


def shrinkage(trace: RoutingTrace) -> np.ndarray:
    """lam_L in [0, 1]: per layer, how far the loads should be shrunk toward their mean.

    With x, y the expert-load shares of the first and second half of the layer's tokens: the lam
    minimising |(1 - lam)(x - mean) - (y - mean)|^2 is 1 - <x - mean, y - mean> / |x - mean|^2; the
    mean of both directions is used, clipped to [0, 1]. 0 where the trace is too small to split.
    """
    halves = _halves(trace)
    if halves is None:
        return np.zeros(trace.num_layers)
    first, rest = (part.loads() for part in halves)
    lam_L = np.zeros(trace.num_layers)
    for layer in range(trace.num_layers):
        x = first[layer] / max(first[layer].sum(), 1e-300)
        y = rest[layer] / max(rest[layer].sum(), 1e-300)
        dx, dy = x - x.mean(), y - y.mean()
        inner = float(dx @ dy)
        terms = [1.0 - inner / float(d @ d) for d in (dx, dy) if float(d @ d) > 0]
        lam_L[layer] = float(np.clip(np.mean(terms), 0.0, 1.0)) if terms else 0.0
    return lam_L


def shrunk_loads(loads_LE: np.ndarray, lam_L: np.ndarray) -> np.ndarray:
    """loads_hat_LE = (1 - lam) * loads + lam * mean of the layer (totals unchanged)."""
    loads_LE = np.asarray(loads_LE, dtype=np.float64)
    lam = np.asarray(lam_L, dtype=np.float64)[:, None]
    return (1.0 - lam) * loads_LE + lam * loads_LE.mean(axis=1, keepdims=True)


def _shares(loads_LE: np.ndarray) -> np.ndarray:
    total_L1 = loads_LE.sum(axis=1, keepdims=True)
    return np.divide(loads_LE, total_L1, out=np.zeros_like(loads_LE), where=total_L1 > 0)


def recent_loads(trace: RoutingTrace, half_life: float) -> np.ndarray:
    """loads_LE with token t of T weighted 2 ** -((T - 1 - t) / (half_life * T)), scaled to the totals."""
    loads_LE = np.asarray(trace.loads(), dtype=np.float64)
    out = np.zeros_like(loads_LE)
    for layer, ids_TK in enumerate(trace.topk_ids):
        count = len(ids_TK)
        age = (count - 1 - np.arange(count)) / max(half_life * count, 1e-300)
        w_T = np.repeat(np.exp2(-age), ids_TK.shape[1])
        out[layer] = np.bincount(ids_TK.ravel(), weights=w_T, minlength=trace.num_experts)
    return loads_LE.sum(axis=1, keepdims=True) * _shares(out)


def drift_ratio(trace: RoutingTrace) -> np.ndarray:
    """ratio_L: per layer, the squared gap between the expert frequencies of the sample's two halves
    over what independent tokens would give (sum_e q_e (1 - q_e) (1 / n1 + 1 / n2), q_e the share of
    tokens choosing e): ~1 for an i.i.d. sample, above it when the routing drifts. 1 where too small."""
    out = np.ones(trace.num_layers)
    for layer, ids_TK in enumerate(trace.topk_ids):
        count = len(ids_TK)
        half = count // 2
        if half < MIN_TOKENS_TO_SPLIT:
            continue
        first = np.bincount(ids_TK[:half].ravel(), minlength=trace.num_experts) / half
        second = np.bincount(ids_TK[half:].ravel(), minlength=trace.num_experts) / (count - half)
        q_E = (first * half + second * (count - half)) / count
        expected = float((q_E * (1.0 - q_E)).sum()) * (1.0 / half + 1.0 / (count - half))
        out[layer] = float(((first - second) ** 2).sum()) / expected if expected > 0 else 1.0
    return out
