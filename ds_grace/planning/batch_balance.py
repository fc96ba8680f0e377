"""Balance at the scale of a forward: a plan's expected GPU loads on resampled batches, and slot swaps
that lower it (pure).

Shape legend: R ranks (GPUs), E experts, N nodes, T tokens, K top-k, B resampled batches.

A forward is as slow as its busiest GPU, and a forward holds far fewer tokens than the window a plan
is fitted on: a placement balanced on the window's total loads can still put experts whose loads rise
and fall together on one GPU, and each batch's busiest GPU pays for it. ``BatchObjective`` scores a
layer on B batches of ``batch_tokens`` tokens drawn with replacement from the window (whole tokens, so
experts chosen together stay together): cost = cross-node copies per token / K + (1 - mean over
batches of mean / max GPU load), every load the expectation over uniform origin GPUs under the
runtime's instance choice (``tar``: own GPU, else the node's copies by weight, else all copies by
weight; ``wrr``: all copies by weight; ``primary``: the primary copy), as ``ds_grace.planning.metrics.evaluate_plan`` gives it.
``swap_refine`` exchanges slots between GPUs while that lowers the cost (first improvement).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ds_grace.planning.plan import LayerPlan, RoutingPolicy
from ds_grace.topology import Topology

BATCH_SAMPLES = 64  # resampled batches per layer
SWAP_PASSES = 3  # rounds over every slot pair of every GPU pair


def weight_matrix(layer: LayerPlan) -> np.ndarray:
    """weight_RE: the WRR weight of expert e's instance on rank r (0: not hosted), every copy; the
    copies a policy routes to: ``routed_weights``."""
    weight_RE = np.zeros((layer.num_ranks, layer.num_experts))
    for rank, (experts, weights) in enumerate(zip(layer.slots, layer.slot_weights)):
        weight_RE[rank, list(experts)] = weights
    return weight_RE


def routed_weights(layer: LayerPlan, policy: RoutingPolicy) -> np.ndarray:
    """weight_RE of the copies `policy` routes to: under "primary" the primary copies alone."""
    if policy != "primary":
        return weight_matrix(layer)
    weight_RE = np.zeros((layer.num_ranks, layer.num_experts))
    weight_RE[list(layer.primary), np.arange(layer.num_experts)] = 1.0
    return weight_RE


def expected_shares(weight_RE: np.ndarray, gpus_per_node: int, policy: RoutingPolicy) -> np.ndarray:
    """share_ER: the expected part of expert e's routes rank r computes, origins uniform (weight_RE as
    ``routed_weights`` gives it)."""
    num_ranks, num_experts = weight_RE.shape
    total_E = weight_RE.sum(axis=0)
    if policy != "tar":  # wrr, or primary (one copy per expert)
        return (weight_RE / total_E).T
    hosts_RE = weight_RE > 0
    node_weight_NE = weight_RE.reshape(-1, gpus_per_node, num_experts).sum(axis=1)
    others_NE = gpus_per_node - hosts_RE.reshape(-1, gpus_per_node, num_experts).sum(axis=1)
    node_R = np.arange(num_ranks) // gpus_per_node
    with np.errstate(divide="ignore", invalid="ignore"):
        # origins on the node without their own copy split over the node's copies by weight
        local_RE = np.where(hosts_RE, others_NE[node_R] * weight_RE / node_weight_NE[node_R], 0.0)
    # origins on nodes without a copy split over all copies by weight
    remote_RE = gpus_per_node * (node_weight_NE == 0).sum(axis=0) * weight_RE / total_E
    return ((hosts_RE + local_RE + remote_RE) / num_ranks).T


def cross_node_copies(
    weight_RE: np.ndarray, gpus_per_node: int, policy: RoutingPolicy, ids_TK: np.ndarray
) -> float:
    """Expected cross-node copies per token (one per remote node its routes reach), origins uniform."""
    num_experts = weight_RE.shape[1]
    node_weight_NE = weight_RE.reshape(-1, gpus_per_node, num_experts).sum(axis=1)
    num_nodes = len(node_weight_NE)
    to_node_EM = (node_weight_NE / weight_RE.sum(axis=0)).T
    leaves_NE = np.ones_like(node_weight_NE, dtype=bool) if policy == "wrr" else node_weight_NE == 0
    to_node_NEM = np.where(leaves_NE[:, :, None], to_node_EM[None], 0.0)  # from origin node n
    reach_NTM = 1.0 - (1.0 - to_node_NEM[:, ids_TK, :]).prod(axis=2)
    reach_NTM[np.arange(num_nodes), :, np.arange(num_nodes)] = 0.0
    return float(reach_NTM.sum(axis=2).mean())


def resampled_loads(ids_TK: np.ndarray, num_experts: int, *, batch_tokens: int, seed: int) -> np.ndarray:
    """loads_BE: routes per expert in BATCH_SAMPLES batches of batch_tokens tokens drawn with replacement."""
    rng = np.random.default_rng(seed)
    rows_BT = rng.integers(0, len(ids_TK), size=(BATCH_SAMPLES, min(batch_tokens, len(ids_TK))))
    picked_BX = ids_TK[rows_BT].reshape(BATCH_SAMPLES, -1)
    loads_BE = np.zeros((BATCH_SAMPLES, num_experts))
    np.add.at(loads_BE, (np.arange(BATCH_SAMPLES)[:, None], picked_BX), (picked_BX >= 0).astype(float))
    return loads_BE


@dataclass(frozen=True)
class BatchObjective:
    """The module doc's cost of one layer on one window (ids_TK) at batches of batch_tokens tokens."""

    ids_TK: np.ndarray
    loads_BE: np.ndarray
    gpus_per_node: int
    policy: RoutingPolicy

    @classmethod
    def of_window(
        cls,
        ids_TK: np.ndarray,
        num_experts: int,
        topology: Topology,
        policy: RoutingPolicy,
        *,
        batch_tokens: int,
    ) -> BatchObjective:
        routed_TK = ids_TK[(ids_TK >= 0).all(axis=1)]
        loads_BE = resampled_loads(routed_TK, num_experts, batch_tokens=batch_tokens, seed=len(routed_TK))
        return cls(routed_TK, loads_BE, topology.gpus_per_node, policy)

    def scores(self, weight_RE: np.ndarray) -> tuple[float, float]:
        """(cross-node copies per token, mean batch balancedness)."""
        gpu_BR = self.gpu_loads(weight_RE)
        balance = float(np.mean(gpu_BR.mean(axis=1) / np.maximum(gpu_BR.max(axis=1), 1e-12)))
        return self.copies(weight_RE), balance

    def gpu_loads(self, weight_RE: np.ndarray) -> np.ndarray:
        """gpu_BR: each batch's expected load on every rank."""
        return self.loads_BE @ expected_shares(weight_RE, self.gpus_per_node, self.policy)

    def copies(self, weight_RE: np.ndarray) -> float:
        return cross_node_copies(weight_RE, self.gpus_per_node, self.policy, self.ids_TK)

    def swap_balances(
        self,
        weight_RE: np.ndarray,
        gpu_BR: np.ndarray,
        a: int,
        experts_I: np.ndarray,
        b: int,
        experts_J: np.ndarray,
    ) -> np.ndarray:
        """balance_IJ: the mean batch balancedness after expert experts_I[i]'s copy moves from rank a to
        b and experts_J[j]'s from b to a (gpu_BR: the loads before), every pair at once: a copy's move
        changes its expert's column of shares alone."""
        deltas = []
        for here, there, experts_X in ((a, b, experts_I), (b, a, experts_J)):
            moved_RX = weight_RE[:, experts_X].copy()
            moved_RX[there], moved_RX[here] = moved_RX[here], 0.0
            change_XR = expected_shares(moved_RX, self.gpus_per_node, self.policy) - expected_shares(
                weight_RE[:, experts_X], self.gpus_per_node, self.policy
            )
            deltas.append(self.loads_BE[:, experts_X, None] * change_XR[None])  # B, X, R
        after_BIJR = gpu_BR[:, None, None, :] + deltas[0][:, :, None, :] + deltas[1][:, None, :, :]
        return (after_BIJR.mean(axis=3) / np.maximum(after_BIJR.max(axis=3), 1e-12)).mean(axis=0)

    def combine(self, copies: float, balance: float) -> float:
        """The cost of (copies, balance): copies / K + 1 - balance."""
        return copies / self.ids_TK.shape[1] + 1.0 - balance

    def cost(self, weight_RE: np.ndarray) -> float:
        return self.combine(*self.scores(weight_RE))


def swapped(layer: LayerPlan, a: int, i: int, b: int, j: int) -> LayerPlan:
    """`layer` with slot i of rank a and slot j of rank b exchanged (weights and primaries follow)."""
    slots, weights = [list(s) for s in layer.slots], [list(w) for w in layer.slot_weights]
    primary = list(layer.primary)
    ea, eb = slots[a][i], slots[b][j]
    slots[a][i], slots[b][j] = eb, ea
    weights[a][i], weights[b][j] = weights[b][j], weights[a][i]
    primary[ea] = b if primary[ea] == a else primary[ea]
    primary[eb] = a if primary[eb] == b else primary[eb]
    return LayerPlan.from_lists(slots=slots, slot_weights=weights, primary=primary)


def _moved(matrix_RE: np.ndarray, a: int, ea: int, b: int, eb: int) -> np.ndarray:
    """matrix_RE with expert ea's entry moved from rank a to b and eb's from b to a."""
    out_RE = matrix_RE.copy()
    out_RE[b, ea], out_RE[a, ea] = matrix_RE[a, ea], 0.0
    out_RE[a, eb], out_RE[b, eb] = matrix_RE[b, eb], 0.0
    return out_RE


def swap_refine(
    layer: LayerPlan, objective: BatchObjective, *, max_copies: float = np.inf, max_swaps: int | None = None
) -> LayerPlan:
    """`layer` after slot swaps between GPUs that lower objective.cost, at most SWAP_PASSES rounds over
    the GPU pairs and max_swaps swaps (None: no cap). Per pair, the swaps that lift the batch balance are
    tried best first and the first that lowers the cost is taken (cross-node copies change only when
    the pair spans nodes); a swap never puts two copies of an expert on one GPU nor lifts cross-node
    copies per token above max_copies."""
    held_RE, routed_RE = weight_matrix(layer), routed_weights(layer, objective.policy)
    copies, balance = objective.scores(routed_RE)
    gpu_BR = objective.gpu_loads(routed_RE)  # kept with routed_RE: recomputed only when a swap is taken
    left = np.inf if max_swaps is None else max_swaps
    gpn = objective.gpus_per_node
    for _ in range(SWAP_PASSES):
        improved = False
        for a, b in itertools.combinations(range(layer.num_ranks), 2):
            experts_I, experts_J = np.array(layer.slots[a]), np.array(layer.slots[b])
            balance_IJ = objective.swap_balances(routed_RE, gpu_BR, a, experts_I, b, experts_J)
            valid_IJ = (held_RE[b, experts_I] == 0)[:, None] & (held_RE[a, experts_J] == 0)[None, :]
            for flat in np.argsort(-balance_IJ, axis=None, kind="stable"):
                i, j = np.unravel_index(flat, balance_IJ.shape)
                if balance_IJ[i, j] <= balance + 1e-12:
                    break
                if not valid_IJ[i, j]:
                    continue
                trial_RE = _moved(routed_RE, a, int(experts_I[i]), b, int(experts_J[j]))
                trial_copies = copies if a // gpn == b // gpn else objective.copies(trial_RE)
                if trial_copies > max_copies + 1e-12:
                    continue
                if (
                    objective.combine(trial_copies, balance_IJ[i, j])
                    < objective.combine(copies, balance) - 1e-9
                ):
                    layer = swapped(layer, a, int(i), b, int(j))
                    held_RE = _moved(held_RE, a, int(experts_I[i]), b, int(experts_J[j]))
                    routed_RE, copies, balance, improved = (
                        trial_RE,
                        trial_copies,
                        float(balance_IJ[i, j]),
                        True,
                    )
                    gpu_BR = objective.gpu_loads(routed_RE)
                    left -= 1
                    if left <= 0:
                        return layer
                    break
        if not improved:
            break
    return layer
