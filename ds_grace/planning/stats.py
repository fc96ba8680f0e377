"""Routing statistics: per-layer expert loads, intra-layer affinity A and inter-layer affinity B.

Shape legend: L layers, T tokens, K top-k, E experts.

- loads_LE[l, e]: (token, expert) assignments of expert e at layer l;
- A_EE (layer l): A[i, j] = tokens that chose both i and j at layer l (i != j; zero diagonal);
- B_EE (layer l -> l + 1): B[i, j] = tokens that chose i at layer l and j at layer l + 1, over the
  tokens recorded at both layers (linked by the trace's token ids).
"""

from __future__ import annotations

import numpy as np

from ds_grace.trace import ExpertLoads, RoutingTrace, TraceError

LoadSource = RoutingTrace | ExpertLoads | np.ndarray


def expert_loads(source: LoadSource) -> np.ndarray:
    """loads_LE as float64 from a per-token trace, aggregate loads, or an array [L, E] (or [E])."""
    if isinstance(source, RoutingTrace):
        return source.loads()
    if isinstance(source, ExpertLoads):
        return np.array(source.loads, dtype=np.float64)
    loads = np.asarray(source, dtype=np.float64)
    if loads.ndim == 1:
        loads = loads[None, :]
    if loads.ndim != 2 or loads.size == 0 or not np.all(np.isfinite(loads)) or loads.min() < 0:
        raise TraceError(
            f"loads (shape {loads.shape}) must be a non-empty finite array [L, E] of values >= 0"
        )
    return loads


def intra_layer_affinity(topk_ids_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """A_EE: co-activation counts of one layer (symmetric, zero diagonal), float64."""
    ids_KT = np.ascontiguousarray(np.asarray(topk_ids_TK, dtype=np.int64).T)
    rows_KT = ids_KT * num_experts
    top_k = ids_KT.shape[0]
    counts = np.zeros(num_experts * num_experts, dtype=np.int64)
    for a in range(top_k):  # one bincount per slot pair: fast and memory-light
        for b in range(a + 1, top_k):
            counts += np.bincount(rows_KT[a] + ids_KT[b], minlength=num_experts * num_experts)
    upper = counts.reshape(num_experts, num_experts).astype(np.float64)
    affinity = upper + upper.T
    np.fill_diagonal(affinity, 0.0)
    return affinity


def affinity_matrices(trace: RoutingTrace) -> list[np.ndarray]:
    """A_EE of every layer of a per-token trace."""
    return [intra_layer_affinity(ids, trace.num_experts) for ids in trace.topk_ids]


def inter_layer_affinity(trace: RoutingTrace, layer: int) -> np.ndarray:
    """B_EE from `layer` to `layer + 1` over the tokens present at both (linked by token id)."""
    if not 0 <= layer < trace.num_layers - 1:
        raise TraceError(f"layer ({layer}) must be in [0, {trace.num_layers - 1}) for inter-layer affinity")
    _, rows_here, rows_next = np.intersect1d(
        trace.tokens_of(layer), trace.tokens_of(layer + 1), assume_unique=True, return_indices=True
    )
    num_experts = trace.num_experts
    here_TK = trace.topk_ids[layer][rows_here].astype(np.int64)
    next_TK = trace.topk_ids[layer + 1][rows_next].astype(np.int64)
    counts = np.zeros(num_experts * num_experts, dtype=np.int64)
    for a in range(here_TK.shape[1]):
        for b in range(next_TK.shape[1]):
            counts += np.bincount(
                here_TK[:, a] * num_experts + next_TK[:, b], minlength=num_experts * num_experts
            )
    return counts.reshape(num_experts, num_experts).astype(np.float64)


INTER_LAYER_WEIGHT = 0.5


def grouping_affinities(trace: RoutingTrace, mode: str = "intra") -> list[np.ndarray]:
    """The affinity each layer is grouped by.

    "intra": A of the layer. "intra+inter" (beyond the paper): A / sum(A) plus INTER_LAYER_WEIGHT x
    the normalised "shared neighbour" affinity B_prev^T B_prev + B_next B_next^T, where B_prev
    links the previous layer to this one and B_next this one to the next: experts whose tokens come
    from, or go to, the same experts count as co-activated. It smooths A with the neighbouring
    layers' evidence when a layer's own sample is small.
    """
    intra = affinity_matrices(trace)
    if mode == "intra":
        return intra
    if mode != "intra+inter":
        raise TraceError(f"grace.grouping.affinity ({mode!r}) must be 'intra' or 'intra+inter'")
    links = [inter_layer_affinity(trace, layer) for layer in range(trace.num_layers - 1)]
    combined = []
    for layer, affinity in enumerate(intra):
        shared = np.zeros_like(affinity)
        if layer > 0:
            shared += _unit(links[layer - 1].T @ links[layer - 1])
        if layer < trace.num_layers - 1:
            shared += _unit(links[layer] @ links[layer].T)
        np.fill_diagonal(shared, 0.0)
        combined.append(_unit(affinity) + INTER_LAYER_WEIGHT * _unit(shared))
    return combined


def _unit(matrix: np.ndarray) -> np.ndarray:
    offdiag = matrix - np.diag(np.diag(matrix))
    total = offdiag.sum()
    return offdiag / total if total > 0 else offdiag
