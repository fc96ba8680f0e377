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
  reach (one copy per node, as the hierarchical all-to-all sends it), averaged over tokens, then over
  layers; cross_gpu_copies_replayed likewise with distinct GPUs other than the origin.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError, RoutingPolicy
from ds_grace.routing import RouteTable, choose_instances
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace

REPLAYED_KEYS = ("balancedness_replayed", "cross_node_copies_replayed", "cross_gpu_copies_replayed")


def origin_ranks(num_tokens: int, num_ranks: int) -> np.ndarray:
    """origin_T: rank floor(i * R / T) for token i (R consecutive blocks in recorded order)."""
    return (np.arange(num_tokens, dtype=np.int64) * num_ranks) // max(num_tokens, 1)


def _distinct_remote(dest_TK: np.ndarray, own_T: np.ndarray, count: int) -> np.ndarray:
    """Per token, how many distinct destinations in [0, count) other than its own it reaches."""
    reached_TX = np.zeros((len(dest_TK), count), dtype=bool)
    rows = np.repeat(np.arange(len(dest_TK)), dest_TK.shape[1])
    reached_TX[rows, dest_TK.ravel()] = True
    reached_TX[np.arange(len(dest_TK)), own_T] = False
    return reached_TX.sum(axis=1)


def _replayed_layer(
    layer_plan: LayerPlan, ids_TK: np.ndarray, *, topology: Topology, policy: RoutingPolicy
) -> dict[str, float]:
    """One layer's REPLAYED_KEYS: each origin rank's block routed by the runtime's choose_instances."""
    num_ranks, gpus = topology.world_size, topology.gpus_per_node
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
    return {
        "balancedness_replayed": float(load_R.mean() / load_R.max()) if load_R.max() > 0 else 1.0,
        "cross_node_copies_replayed": float(
            _distinct_remote(dest_TK // gpus, origin_T // gpus, topology.num_nodes).mean()
        ),
        "cross_gpu_copies_replayed": float(_distinct_remote(dest_TK, origin_T, num_ranks).mean()),
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
