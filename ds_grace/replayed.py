"""Replayed plan metrics: the trace's tokens routed through the runtime's own instance choice.

Shape legend: T tokens (of one layer), K top-k, R ranks (GPUs), N nodes.

``evaluate_plan`` (planning/metrics.py) gives expectations with every origin GPU equally likely.
``replayed_metrics`` instead places each token on one origin GPU and routes it exactly as the runtime
does, with ``ds_grace.routing.RouteTable`` and ``choose_instances`` (TAR / WRR / primary):

- origin rule (deterministic): at every layer, the layer's T tokens in recorded order are cut into R
  consecutive blocks, token i going to rank floor(i * R / T) (block sizes differ by at most one);
  rank g routes its block as one batch (route_offset 0), as the runtime routes one forward pass;
- balancedness_replayed: mean / max of the (token, expert) routes each rank computes, per layer,
  averaged over layers;
- cross_node_copies_replayed: per token, the distinct nodes other than its origin's that its routes
  reach (one copy per node: the rows the hierarchical path's first hop sends to other nodes,
  ``ds_grace.comm.schedule.path_rows``), averaged over tokens, then over layers;
  cross_gpu_copies_replayed likewise with distinct GPUs other than the origin (the flat hop's rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ds_grace.comm.schedule import cross_node_mask, path_rows
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError, RoutingPolicy
from ds_grace.routing import RouteTable, choose_instances
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace

REPLAYED_KEYS = ("balancedness_replayed", "cross_node_copies_replayed", "cross_gpu_copies_replayed")


def origin_ranks(num_tokens: int, num_ranks: int) -> np.ndarray:
    """origin_T: rank floor(i * R / T) for token i (R consecutive blocks in recorded order)."""
    return (np.arange(num_tokens, dtype=np.int64) * num_ranks) // max(num_tokens, 1)


def _copies(dest_TK: np.ndarray, origin_T: np.ndarray, topology: Topology) -> tuple[float, float]:
    """(cross-node, cross-GPU) copies per token: the rows each origin's block sends to other nodes on
    the hierarchical path's first hop, and to other GPUs on the flat hop (``schedule.path_rows``)."""
    world = topology.world_size
    crosses_RR = cross_node_mask(topology)
    member_TR = np.zeros((len(dest_TK), world), dtype=bool)
    member_TR[np.repeat(np.arange(len(dest_TK)), dest_TK.shape[1]), dest_TK.ravel()] = True
    cross_node = cross_gpu = 0
    for origin in range(world):
        block_TR = member_TR[origin_T == origin]
        flat = path_rows(block_TR, path="flat", topology=topology, origin=origin)[0]
        first = path_rows(block_TR, path="hierarchical", topology=topology, origin=origin)[0]
        cross_gpu += int(flat[origin].sum() - flat[origin, origin])
        cross_node += int(first[origin, crosses_RR[origin]].sum())
    tokens = max(1, len(dest_TK))
    return cross_node / tokens, cross_gpu / tokens


def _replayed_layer(
    layer_plan: LayerPlan, ids_TK: np.ndarray, *, topology: Topology, policy: RoutingPolicy
) -> dict[str, float]:
    """One layer's REPLAYED_KEYS: each origin rank's block routed by the runtime's choose_instances."""
    num_ranks = topology.world_size
    table = RouteTable.build(layer_plan, topology, policy)
    origin_T = origin_ranks(len(ids_TK), num_ranks)
    dest_TK = np.empty(ids_TK.shape, dtype=np.int64)
    ids = torch.from_numpy(np.ascontiguousarray(ids_TK, dtype=np.int64))
    for rank in range(num_ranks):
        block = np.flatnonzero(origin_T == rank)
        if len(block) == 0:
            continue
        chosen_TK, _ = choose_instances(table, ids[block], origin_rank=rank)
        dest_TK[block] = chosen_TK.numpy()
    load_R = np.bincount(dest_TK.ravel(), minlength=num_ranks).astype(np.float64)
    cross_node, cross_gpu = _copies(dest_TK, origin_T, topology)
    return {
        "balancedness_replayed": float(load_R.mean() / load_R.max()) if load_R.max() > 0 else 1.0,
        "cross_node_copies_replayed": cross_node,
        "cross_gpu_copies_replayed": cross_gpu,
    }


def replayed_metrics(
    trace: RoutingTrace,
    plan: GracePlan,
    *,
    routing_policy: RoutingPolicy | None = None,
    per_layer: bool = False,
) -> dict[str, Any]:
    """The REPLAYED_KEYS of `plan` on `trace` (see the module docstring), plus the routing policy."""
    if not isinstance(trace, RoutingTrace):
        raise PlanError("replayed metrics need per-token routing; the trace holds loads only")
    if trace.num_layers != plan.num_layers or trace.num_experts != plan.num_experts:
        raise PlanError(
            f"trace ({trace.num_layers} layers x {trace.num_experts} experts) does not match the plan "
            f"({plan.num_layers} layers x {plan.num_experts} experts)"
        )
    policy: RoutingPolicy = routing_policy or plan.meta.get("routing_policy", "tar")
    topo = plan.topology
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small tensor ops: one thread is several times faster than a pool
    try:
        rows = [
            _replayed_layer(layer_plan, ids_TK, topology=topo, policy=policy)
            for layer_plan, ids_TK in zip(plan.layers, trace.topk_ids)
        ]
    finally:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {key: float(np.mean([row[key] for row in rows])) for key in REPLAYED_KEYS}
    result["replay_origin_rule"] = "consecutive blocks: token i of T on rank floor(i * R / T)"
    if per_layer:
        result["per_layer_replayed"] = rows
    return result
