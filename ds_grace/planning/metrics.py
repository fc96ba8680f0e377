"""Plan quality from a trace: expectations over every origin GPU equally likely (deterministic).

Shape legend: T tokens, K top-k, E experts, R ranks (GPUs), N nodes, G origin ranks.

For a token on origin rank g that chose expert e, the instance on rank r computes it with the
probability given by ``route_table`` (plan.py, the tables the runtime applies). Instance choices of
a token's experts are independent. Per MoE layer and token, averaged over tokens, then over layers:

- cross_node_copies_per_token: distinct remote nodes the token must reach (one copy per node: HSC),
  counted as the rows the hierarchical path's first hop sends to other nodes;
- cross_gpu_copies_per_token: distinct GPUs other than its origin it must reach (one copy per GPU),
  counted as the rows the flat hop sends to other GPUs;
- balancedness: mean / max of the expected GPU loads (1.0 = perfect), averaged over layers;
- max_gpu_load_ratio: max / mean of the expected GPU loads, of the worst layer;
- vanilla_cross_node_copies_per_token: DeepSpeed's reference, contiguous placement and no dedup:
  every (token, expert) pair whose expert sits on another node.
Rows per hop come from the runtime's own traffic model (``ds_grace.comm.schedule.hop_rows``), fed
with each origin's expected rows per destination rank and node.
Copies need per-token routing; from aggregate loads they are None. Loads-only sources still give
the balance metrics and, when top_k is known, the vanilla reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

from ds_grace.comm.schedule import cross_node_mask, hop_rows
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError, RoutingPolicy, route_table
from ds_grace.planning.stats import expert_loads
from ds_grace.topology import Topology
from ds_grace.trace import ExpertLoads, RoutingTrace

METRIC_KEYS = (
    "cross_node_copies_per_token",
    "cross_gpu_copies_per_token",
    "balancedness",
    "max_gpu_load_ratio",
    "vanilla_cross_node_copies_per_token",
)
TOKEN_CHUNK = 4096


def routing_probabilities(layer: LayerPlan, topology: Topology, policy: RoutingPolicy) -> np.ndarray:
    """prob_GER[g, e, r]: probability that a token on rank g has expert e computed on rank r."""
    cand_rank_GEI, cand_cdf_GEI = route_table(layer, topology, policy)
    prob_GEI = np.diff(cand_cdf_GEI, axis=2, prepend=0.0)
    num_ranks, num_experts, _ = cand_rank_GEI.shape
    prob_GER = np.zeros((num_ranks, num_experts, num_ranks))
    valid = cand_rank_GEI >= 0
    g_idx, e_idx, _ = np.nonzero(valid)
    np.add.at(prob_GER, (g_idx, e_idx, cand_rank_GEI[valid]), prob_GEI[valid])
    return prob_GER


def expected_gpu_loads(
    loads_E: np.ndarray,
    layer: LayerPlan,
    topology: Topology,
    policy: RoutingPolicy,
    prob_GER: np.ndarray | None = None,
) -> np.ndarray:
    """load_R: expected (token, expert) assignments each rank computes, origins uniform."""
    prob = routing_probabilities(layer, topology, policy) if prob_GER is None else prob_GER
    return np.asarray(loads_E, dtype=np.float64) @ prob.mean(axis=0)


def expected_reach(topk_ids_TK: np.ndarray, reach_GEX: np.ndarray) -> np.ndarray:
    """reached_GX[g, x]: expected tokens of origin g with >= 1 route on destination x, summed over
    tokens (instance choices independent across a token's experts; reach_GEX[g, e, x]: probability
    that expert e of a token on g is computed on x).

    P(x missed) = prod over the token's experts of (1 - reach[e, x]), taken as exp of a sum of logs:
    one sparse (tokens x experts) product for all origins at once. Origins with equal rows share work.
    """
    num_origins, num_experts, num_dest = reach_GEX.shape
    origins_by_row: dict[bytes, list[int]] = {}
    for origin in range(num_origins):
        origins_by_row.setdefault(reach_GEX[origin].tobytes(), []).append(origin)
    rows_U = reach_GEX[[origins[0] for origins in origins_by_row.values()]]
    # log(1 - reach), a certain reach (factor 0) as -1000: exp of any sum holding it is exactly 0
    log_missed_EX = np.where(rows_U >= 1.0, -1000.0, np.log(np.clip(1.0 - rows_U, 1e-300, None)))
    log_missed_EX = log_missed_EX.transpose(1, 0, 2).reshape(num_experts, -1)
    num_tokens, top_k = topk_ids_TK.shape
    choice_TE = sparse.csr_matrix(
        (np.ones(topk_ids_TK.size), topk_ids_TK.ravel(), np.arange(0, topk_ids_TK.size + 1, top_k)),
        shape=(num_tokens, num_experts),
    )
    reached_UX = np.zeros((len(rows_U), num_dest))
    for start in range(0, num_tokens, TOKEN_CHUNK):
        log_missed_TX = choice_TE[start : start + TOKEN_CHUNK] @ log_missed_EX
        reached_UX += (1.0 - np.exp(log_missed_TX)).reshape(-1, len(rows_U), num_dest).sum(axis=0)
    reached_GX = np.empty((num_origins, num_dest))
    for unique, origins in enumerate(origins_by_row.values()):
        reached_GX[origins] = reached_UX[unique]
    return reached_GX


def copies_per_token(
    rows_GR: np.ndarray, rows_GN: np.ndarray, *, topology: Topology, num_tokens: float
) -> tuple[float, float]:
    """(cross-node, cross-GPU) copies per token, averaged over origins, from each origin g's (expected)
    rows per destination rank rows_GR[g] and node rows_GN[g]: the rows the hierarchical path's first
    hop sends to other nodes, and the rows the flat hop sends to other GPUs (ds_grace.comm.schedule)."""
    world = topology.world_size
    crosses_RR = cross_node_mask(topology)
    cross_node = cross_gpu = 0.0
    for origin in range(world):
        flat = hop_rows(rows_GR[origin], rows_GN[origin], path="flat", topology=topology, origin=origin)[0]
        first = hop_rows(
            rows_GR[origin], rows_GN[origin], path="hierarchical", topology=topology, origin=origin
        )[0]
        cross_gpu += float(flat[origin].sum() - flat[origin, origin])
        cross_node += float(first[origin, crosses_RR[origin]].sum())
    if num_tokens == 0:
        return 0.0, 0.0
    return cross_node / (world * num_tokens), cross_gpu / (world * num_tokens)


def vanilla_copies_per_token(loads_E: np.ndarray, topology: Topology, top_k: int) -> float:
    """DeepSpeed-MoE's cross-node copies per token: contiguous placement (expert e on rank
    floor(e * R / E)), no dedup (one row per route: either path's hops then send the same rows across
    nodes), origins uniform: K (N - 1) / N per token, whatever the loads."""
    loads_E = np.asarray(loads_E, dtype=np.float64)
    num_experts = len(loads_E)
    rank_E = np.arange(num_experts) * topology.world_size // max(1, num_experts)
    rows_R = np.bincount(rank_E, weights=loads_E, minlength=topology.world_size)
    rows_N = rows_R.reshape(topology.num_nodes, topology.gpus_per_node).sum(axis=1)
    rows_GR, rows_GN = np.tile(rows_R, (topology.world_size, 1)), np.tile(rows_N, (topology.world_size, 1))
    cross_node, _ = copies_per_token(rows_GR, rows_GN, topology=topology, num_tokens=loads_E.sum() / top_k)
    return cross_node


def evaluate_plan(
    trace: RoutingTrace | ExpertLoads | np.ndarray,
    plan: GracePlan,
    *,
    routing_policy: RoutingPolicy | None = None,
    per_layer: bool = False,
    dedup: bool = True,
) -> dict[str, Any]:
    """The metrics of METRIC_KEYS (None where the trace cannot give one), plus the routing policy.

    routing_policy defaults to the one the plan was built for (plan.meta["routing_policy"], else "tar").
    With per_layer=True, a "per_layer" entry lists each layer's values. dedup=False counts copies as
    DeepSpeed-MoE's all-to-all sends them: one per (token, expert) pair, not one per destination.
    """
    policy: RoutingPolicy = routing_policy or plan.meta.get("routing_policy", "tar")
    loads_LE = expert_loads(trace)
    per_token = isinstance(trace, RoutingTrace)
    if loads_LE.shape[0] != plan.num_layers:
        raise PlanError(f"trace has {loads_LE.shape[0]} MoE layers but the plan has {plan.num_layers}")
    if loads_LE.shape[1] != plan.num_experts:
        raise PlanError(
            f"trace has {loads_LE.shape[1]} experts per layer but the plan has {plan.num_experts}"
        )
    topo = plan.topology
    layers: list[dict[str, float | None]] = []
    for index, layer in enumerate(plan.layers):
        prob_GER = routing_probabilities(layer, topo, policy)
        gpu_R = expected_gpu_loads(loads_LE[index], layer, topo, policy, prob_GER)
        row: dict[str, float | None] = {
            "balancedness": float(gpu_R.mean() / gpu_R.max()) if gpu_R.max() > 0 else 1.0,
            "max_gpu_load_ratio": float(gpu_R.max() / gpu_R.mean()) if gpu_R.mean() > 0 else 1.0,
            "cross_node_copies_per_token": None,
            "cross_gpu_copies_per_token": None,
        }
        if per_token:
            ids = trace.topk_ids[index]
            node_prob_GEN = prob_GER.reshape(*prob_GER.shape[:2], topo.num_nodes, topo.gpus_per_node).sum(
                axis=3
            )
            if dedup:  # one row per token and destination
                rows_GR, rows_GN = expected_reach(ids, prob_GER), expected_reach(ids, node_prob_GEN)
            else:  # DeepSpeed-MoE's all-to-all: one row per route
                count_E = np.bincount(ids.ravel(), minlength=plan.num_experts).astype(np.float64)
                rows_GR, rows_GN = count_E @ prob_GER, count_E @ node_prob_GEN
            row["cross_node_copies_per_token"], row["cross_gpu_copies_per_token"] = copies_per_token(
                rows_GR, rows_GN, topology=topo, num_tokens=len(ids)
            )
        layers.append(row)
    top_k = trace.top_k if isinstance(trace, (RoutingTrace, ExpertLoads)) else None
    vanilla = (
        None
        if top_k is None
        else float(np.mean([vanilla_copies_per_token(loads_E, topo, top_k) for loads_E in loads_LE]))
    )

    def mean_of(key: str) -> float | None:
        values = [row[key] for row in layers]
        return None if any(v is None for v in values) else float(np.mean(values))

    result: dict[str, Any] = {
        "cross_node_copies_per_token": mean_of("cross_node_copies_per_token"),
        "cross_gpu_copies_per_token": mean_of("cross_gpu_copies_per_token"),
        "balancedness": mean_of("balancedness"),
        "max_gpu_load_ratio": float(max(row["max_gpu_load_ratio"] for row in layers)),  # type: ignore[type-var]
        "vanilla_cross_node_copies_per_token": vanilla,
        "routing_policy": policy,
        "policy": plan.policy,
    }
    if per_layer:
        result["per_layer"] = layers
    return result
