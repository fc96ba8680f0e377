"""Hierarchical expert grouping (GRACE.md section 2): experts -> nodes -> GPUs by spectral clustering.

Shape legend: L layers, E experts, n experts of one node, N nodes, G GPUs per node.

- Node level, "fully non-uniform": spectral clustering of A into N groups; sizes follow affinity and
  are only repaired into [G, min(G * cap, E - (N - 1) * G)] (every GPU needs a primary; memory cap).
- GPU level, "controlled non-uniform": spectral clustering of a node's experts into G groups, then the
  overflow/fill repair into [max(1, S - delta), min(S + delta, cap)], S = floor(n / G),
  delta = max(1, round(S * r)); r is configured or chosen at the knee of (size deviation, kept affinity).
- ``equal_sizes=True`` gives equal-size groups at both levels (the Occult baseline).
- Beyond the paper, with loads and a load slack: after clustering, each level is evened out by load
  (moves and swaps that cost the least affinity, sizes kept in bounds), and ``rebalance_primaries``
  moves primaries around replicas already placed. Spectral groups follow affinity only; a small
  replica budget cannot always even out the load they leave.
Node-level clusterings are scored by normalised cut (the objective spectral clustering relaxes).
Group ids map to nodes / local ranks in order of each group's smallest expert id (deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.cluster.vq
import scipy.linalg

from ds_grace.topology import Topology

KNEE_TOLERANCE = 0.05
RATIO_CANDIDATES: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


class GroupingError(ValueError):
    """Experts cannot be grouped under the given topology and memory cap."""


def _cluster_qr(embedding_nk: np.ndarray) -> np.ndarray:
    """Deterministic label assignment from a spectral embedding (Damle, Minden & Ying, 2019)."""
    num_clusters = embedding_nk.shape[1]
    _, _, pivots = scipy.linalg.qr(embedding_nk.T, pivoting=True, mode="economic")
    u, _, vt = scipy.linalg.svd(embedding_nk[pivots[:num_clusters], :].T)
    return np.abs(embedding_nk @ (u @ vt)).argmax(axis=1)


def _embedding(affinity_nn: np.ndarray, num_clusters: int) -> np.ndarray | None:
    """The first num_clusters eigenvectors of the normalised Laplacian, scaled by D^-1/2."""
    size = affinity_nn.shape[0]
    weights = (affinity_nn + affinity_nn.T) / 2.0
    total = weights.sum()
    if total <= 0:
        return None
    weights = weights + 1e-3 * total / size**2  # keeps the graph connected (isolated experts)
    np.fill_diagonal(weights, 0.0)
    inv_sqrt_degree = 1.0 / np.sqrt(weights.sum(axis=1))
    laplacian = np.eye(size) - inv_sqrt_degree[:, None] * weights * inv_sqrt_degree[None, :]
    _, vectors = scipy.linalg.eigh(laplacian, subset_by_index=[0, num_clusters - 1])
    return vectors * inv_sqrt_degree[:, None]


def normalized_cut(affinity_nn: np.ndarray, labels_n: np.ndarray, num_clusters: int) -> float:
    """sum over clusters C of cut(C, rest) / vol(C); an empty cluster makes it infinite."""
    onehot_nC = (labels_n[:, None] == np.arange(num_clusters)[None, :]).astype(np.float64)
    if (onehot_nC.sum(axis=0) == 0).any():
        return float("inf")
    volume_C = onehot_nC.T @ affinity_nn.sum(axis=1)
    inside_C = np.einsum("nc,nm,mc->c", onehot_nC, affinity_nn, onehot_nC)
    cut_C = volume_C - inside_C
    return float(np.sum(np.divide(cut_C, volume_C, out=np.zeros_like(cut_C), where=volume_C > 0)))


def candidate_labels(
    affinity_nn: np.ndarray, num_clusters: int, *, with_kmeans: bool = True
) -> list[np.ndarray]:
    """Spectral clusterings of A into num_clusters: cluster-QR and (with_kmeans) a seeded k-means run."""
    size = affinity_nn.shape[0]
    if num_clusters <= 1:
        return [np.zeros(size, dtype=np.int64)]
    if num_clusters >= size:
        return [np.arange(size, dtype=np.int64)]
    embedding = _embedding(affinity_nn, num_clusters)
    if embedding is None:
        return [np.arange(size, dtype=np.int64) * num_clusters // size]
    found = [_cluster_qr(embedding).astype(np.int64)]
    if not with_kmeans:
        return found
    scaled = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-300)
    _, labels = scipy.cluster.vq.kmeans2(scaled, num_clusters, minit="++", seed=0)
    found.append(labels.astype(np.int64))
    return found


def spectral_labels(affinity_nn: np.ndarray, num_clusters: int, *, with_kmeans: bool = True) -> np.ndarray:
    """Cluster labels in [0, num_clusters): the candidate with the smallest normalised cut.

    Normalised spectral clustering balances cluster volumes; an expert's volume (row sum of A) is
    (K - 1) x its load, so clusters also tend toward balanced load.
    """
    found = candidate_labels(affinity_nn, num_clusters, with_kmeans=with_kmeans)
    cuts = [normalized_cut(affinity_nn, labels, num_clusters) for labels in found]
    return found[int(np.argmin(cuts))]


def kept_affinity(affinity_nn: np.ndarray, labels_n: np.ndarray) -> float:
    """sum over groups C of sum_{i, j in C} A[i, j]."""
    same = labels_n[:, None] == labels_n[None, :]
    return float(affinity_nn[same].sum())


def repair_group_sizes(
    labels_n: np.ndarray, affinity_nn: np.ndarray, *, num_groups: int, min_size: int, max_size: int
) -> np.ndarray:
    """Bring every group's size into [min_size, max_size] (GRACE.md section 2, steps b-d).

    b. an oversized group keeps the max_size members with the highest affinity to the rest of it;
       the others go to an overflow set;
    c. overflow experts go, best first, to the group with room where they add the most affinity;
    d. a group below min_size takes in the member of a group above min_size that costs the least
       affinity (affinity to its own group minus affinity to the receiving group).
    """
    size = len(labels_n)
    if not num_groups * min_size <= size <= num_groups * max_size:
        raise GroupingError(
            f"{size} experts cannot form {num_groups} groups of size in [{min_size}, {max_size}]"
        )
    labels = np.asarray(labels_n, dtype=np.int64).copy()
    overflow: list[int] = []
    for group in range(num_groups):
        members = np.flatnonzero(labels == group)
        if len(members) > max_size:
            score = affinity_nn[np.ix_(members, members)].sum(axis=1)
            ranked = members[np.lexsort((members, -score))]
            labels[ranked[max_size:]] = -1
            overflow.extend(ranked[max_size:].tolist())
    groups = np.arange(num_groups)
    sizes = np.bincount(labels[labels >= 0], minlength=num_groups)
    overflow.sort()
    while overflow:
        onehot_nG = (labels[:, None] == groups[None, :]).astype(np.float64)
        gain_OG = affinity_nn[overflow] @ onehot_nG
        gain_OG[:, sizes >= max_size] = -np.inf
        row, group = np.unravel_index(int(np.argmax(gain_OG)), gain_OG.shape)
        labels[overflow.pop(row)] = group
        sizes[group] += 1
    while (sizes < min_size).any():
        receiver = int(np.argmin(sizes))
        candidates = np.flatnonzero((sizes[labels] > min_size) & (labels != receiver))
        onehot_nG = (labels[:, None] == groups[None, :]).astype(np.float64)
        to_groups = affinity_nn[candidates] @ onehot_nG
        cost = to_groups[np.arange(len(candidates)), labels[candidates]] - to_groups[:, receiver]
        moved = int(candidates[np.argmin(cost)])
        sizes[labels[moved]] -= 1
        labels[moved] = receiver
        sizes[receiver] += 1
    return labels


def balance_group_loads(
    labels_n: np.ndarray,
    affinity_nn: np.ndarray,
    load_n: np.ndarray,
    *,
    num_groups: int,
    min_size: int,
    max_size: int,
    slack: float,
    offset_G: np.ndarray | None = None,
    forbidden_nG: np.ndarray | None = None,
) -> np.ndarray:
    """Move or swap experts out of the heaviest group until no group carries more than
    (1 + slack) x the mean group load, or no single move or swap lowers the heaviest load.

    Sizes stay in [min_size, max_size]. Among the steps that take at least half as much load off
    the heaviest group as the best step (or as its excess), each takes the move or swap that loses
    the least affinity per unit of load moved (a gain in affinity ranks first).
    offset_G adds load a group carries besides these experts (replicas); forbidden_nG[i, g]
    keeps expert i out of group g. Beyond the paper: spectral groups follow affinity only, and a
    replica budget cannot always even out what they leave.
    """
    labels = np.asarray(labels_n, dtype=np.int64).copy()
    offset = np.zeros(num_groups) if offset_G is None else np.asarray(offset_G, dtype=np.float64)
    forbidden = np.zeros((len(labels), num_groups), dtype=bool) if forbidden_nG is None else forbidden_nG
    total = float(load_n.sum() + offset.sum())
    if total <= 0 or num_groups <= 1:
        return labels
    limit = (1.0 + slack) * total / num_groups
    groups = np.arange(num_groups)
    eps = 1e-12 * total
    onehot_nG = (labels[:, None] == groups[None, :]).astype(np.float64)
    group_load = load_n @ onehot_nG + offset
    sizes = onehot_nG.sum(axis=0)
    to_group_nG = affinity_nn @ onehot_nG  # kept up to date move by move

    def shift(expert: int, source: int, destination: int) -> None:
        labels[expert] = destination
        group_load[source] -= load_n[expert]
        group_load[destination] += load_n[expert]
        sizes[source] -= 1
        sizes[destination] += 1
        to_group_nG[:, source] -= affinity_nn[:, expert]
        to_group_nG[:, destination] += affinity_nn[:, expert]

    for _ in range(4 * len(labels)):
        heavy = int(np.argmax(group_load))
        excess = group_load[heavy] - limit
        if excess <= eps:
            break
        members = np.flatnonzero(labels == heavy)
        others = np.flatnonzero(labels != heavy)
        member_load = load_n[members]
        member_here = to_group_nG[members, heavy]
        # moves: member i -> group g
        move_gain = group_load[heavy] - np.maximum(
            group_load[heavy] - member_load[:, None], group_load[None, :] + member_load[:, None]
        )
        move_ok = (move_gain > eps) & (sizes[None, :] < max_size) & (groups[None, :] != heavy)
        move_ok &= (sizes[heavy] > min_size) & ~forbidden[members]
        # swaps: member i <-> expert j of another group
        other_group = labels[others]
        delta = member_load[:, None] - load_n[others][None, :]
        swap_gain = group_load[heavy] - np.maximum(
            group_load[heavy] - delta, group_load[other_group][None, :] + delta
        )
        swap_ok = (swap_gain > eps) & (delta > 0)
        swap_ok &= ~forbidden[members][:, other_group] & ~forbidden[others, heavy][None, :]
        top_gain = max(move_gain[move_ok].max(initial=0.0), swap_gain[swap_ok].max(initial=0.0))
        if top_gain <= 0:
            break
        # only steps that take at least half of what the best step (or the excess) takes count
        floor = 0.5 * min(top_gain, excess)
        move_ok &= move_gain >= floor
        swap_ok &= swap_gain >= floor
        best_move = best_swap = np.inf
        if move_ok.any():
            move_cost = member_here[:, None] - to_group_nG[members]
            move_score = np.where(move_ok, move_cost / np.where(move_ok, move_gain, 1.0), np.inf)
            best_move = float(move_score.min())
        if swap_ok.any():
            swap_cost = (
                member_here[:, None]
                - to_group_nG[members][:, other_group]
                + to_group_nG[others, other_group][None, :]
                - to_group_nG[others, heavy][None, :]
                + 2.0 * affinity_nn[members][:, others]
            )
            swap_score = np.where(swap_ok, swap_cost / np.where(swap_ok, swap_gain, 1.0), np.inf)
            best_swap = float(swap_score.min())
        if best_move <= best_swap:
            row, group = np.unravel_index(int(np.argmin(move_score)), move_score.shape)
            shift(int(members[row]), heavy, int(group))
        else:
            row, col = np.unravel_index(int(np.argmin(swap_score)), swap_score.shape)
            partner, group = int(others[col]), int(other_group[col])
            shift(int(members[row]), heavy, group)
            shift(partner, group, heavy)
    return labels


def _ordered(labels_n: np.ndarray, num_groups: int) -> np.ndarray:
    """Renumber groups in order of their smallest member."""
    first = np.array([np.flatnonzero(labels_n == g).min() for g in range(num_groups)])
    rank_of_group = np.empty(num_groups, dtype=np.int64)
    rank_of_group[np.argsort(first, kind="stable")] = np.arange(num_groups)
    return rank_of_group[labels_n]


def gpu_size_bounds(num_members: int, gpus_per_node: int, ratio: float, cap: int | None) -> tuple[int, int]:
    """[max(1, S - delta), min(S + delta, cap)] with S = floor(n / G), delta = max(1, round(S * r))."""
    target = num_members // gpus_per_node
    delta = max(1, int(np.floor(target * ratio + 0.5)))
    upper = target + delta if cap is None else min(target + delta, cap)
    return max(1, target - delta), upper


def knee_index(deviation: Sequence[float], kept: Sequence[float]) -> int:
    """Index of the knee of a rising (deviation, kept) curve: the point farthest above the chord.

    Both axes are scaled to [0, 1]; among points within KNEE_TOLERANCE of the best, the earliest
    (smallest ratio) wins, so a nearly straight curve does not buy size deviation for noise.
    """
    x, y = np.asarray(deviation, dtype=np.float64), np.asarray(kept, dtype=np.float64)
    x_span, y_span = x.max() - x.min(), y.max() - y.min()
    if y_span <= 1e-12 * max(1.0, abs(y.max())):
        return 0
    if x_span <= 0:
        return int(np.argmax(y))
    score = (y - y.min()) / y_span - (x - x.min()) / x_span
    return int(np.flatnonzero(score >= score.max() - KNEE_TOLERANCE)[0])


@dataclass(frozen=True)
class GroupingResult:
    """Primary placement per layer and how it was chosen.

    ratio_curve lists (r, size deviation S(r), kept GPU-level affinity U(r)) for each candidate r.
    """

    expert2rank_LE: np.ndarray
    ratio: float | None
    ratio_curve: tuple[tuple[float, float, float], ...]
    kept_node_affinity: float
    kept_gpu_affinity: float


def _node_bounds(num_experts: int, topology: Topology, cap: int | None, equal_sizes: bool) -> tuple[int, int]:
    num_nodes, gpus = topology.num_nodes, topology.gpus_per_node
    node_cap = num_experts if cap is None else gpus * cap
    if equal_sizes:
        return num_experts // num_nodes, min(-(-num_experts // num_nodes), node_cap)
    return gpus, min(node_cap, num_experts - (num_nodes - 1) * gpus)


def check_fits(num_experts: int, topology: Topology, cap: int | None) -> None:
    """Raise GroupingError unless E experts fit D GPUs with >= 1 primary each and <= cap each."""
    world = topology.world_size
    if num_experts < world:
        raise GroupingError(
            f"num_experts ({num_experts}) must be >= the world size ({world}): every GPU hosts at least one "
            "primary expert (with fewer experts than GPUs, plan with policy 'grace' or 'eplb': every GPU then "
            "holds replicas)"
        )
    needed = -(-num_experts // world)
    if cap is not None and cap < needed:
        raise GroupingError(
            f"grace.grouping.max_experts_per_gpu ({cap}) is too small: {num_experts} experts on {world} GPUs "
            f"need at least {needed} slots per GPU"
        )


def hierarchical_grouping(
    affinity_LEE: Sequence[np.ndarray],
    topology: Topology,
    *,
    ratio: float | str = "auto",
    max_experts_per_gpu: int | None = None,
    equal_sizes: bool = False,
    loads_LE: np.ndarray | None = None,
    load_slack: float | None = None,
) -> GroupingResult:
    """Group each layer's experts into nodes, then GPUs; return the primary rank of every expert.

    With loads_LE and load_slack, each level's groups are then evened out by load
    (``balance_group_loads``) within the same size bounds.
    """
    if not affinity_LEE:
        raise GroupingError("affinity_LEE is empty; grouping needs >= 1 layer")
    num_experts = affinity_LEE[0].shape[0]
    cap = max_experts_per_gpu
    check_fits(num_experts, topology, cap)
    if ratio != "auto" and not (isinstance(ratio, (int, float)) and 0.0 <= float(ratio) <= 1.0):
        raise GroupingError(f'grace.grouping.ratio ({ratio!r}) must be in [0, 1] or "auto"')
    num_nodes, gpus = topology.num_nodes, topology.gpus_per_node
    node_lo, node_hi = _node_bounds(num_experts, topology, cap, equal_sizes)

    # per layer and node: members, GPU-level spectral labels (step a, shared by every candidate r)
    nodes_per_layer: list[list[tuple[np.ndarray, np.ndarray]]] = []
    kept_node = total = 0.0
    balancing = loads_LE is not None and load_slack is not None
    for layer, affinity in enumerate(affinity_LEE):
        repaired = [
            repair_group_sizes(found, affinity, num_groups=num_nodes, min_size=node_lo, max_size=node_hi)
            for found in candidate_labels(affinity, num_nodes)
        ]
        cuts = [normalized_cut(affinity, labels, num_nodes) for labels in repaired]
        labels = repaired[int(np.argmin(cuts))]
        if balancing:
            labels = balance_group_loads(
                labels,
                affinity,
                loads_LE[layer],
                num_groups=num_nodes,
                min_size=node_lo,
                max_size=node_hi,
                slack=load_slack,
            )
        labels = _ordered(labels, num_nodes)
        kept_node += kept_affinity(affinity, labels)
        total += float(affinity.sum())
        nodes = []
        for node in range(num_nodes):
            members = np.flatnonzero(labels == node)
            sub = affinity[np.ix_(members, members)]
            nodes.append((members, spectral_labels(sub, gpus, with_kmeans=False)))
        nodes_per_layer.append(nodes)

    candidates = RATIO_CANDIDATES if ratio == "auto" else (float(ratio),)
    cache: dict[tuple[int, int, int, int, bool], np.ndarray] = {}

    def gpu_labels(layer: int, node: int, r: float | None, balanced: bool) -> np.ndarray:
        members, labels = nodes_per_layer[layer][node]
        if r is None:
            lo, hi = len(members) // gpus, -(-len(members) // gpus)
        else:
            lo, hi = gpu_size_bounds(len(members), gpus, r, cap)
        key = (layer, node, lo, hi, balanced)
        if key not in cache:
            sub = affinity_LEE[layer][np.ix_(members, members)]
            if balanced:
                found = balance_group_loads(
                    gpu_labels(layer, node, r, False),
                    sub,
                    loads_LE[layer][members],
                    num_groups=gpus,
                    min_size=lo,
                    max_size=hi,
                    slack=load_slack,
                )
            else:
                found = repair_group_sizes(labels, sub, num_groups=gpus, min_size=lo, max_size=hi)
            cache[key] = _ordered(found, gpus)
        return cache[key]

    def evaluate(r: float | None, balanced: bool = False) -> tuple[float, float]:
        """(S(r), U(r)) of the repaired clusters (the knee looks at grouping, not load balancing)."""
        kept = squared = 0.0
        count = 0
        for layer, nodes in enumerate(nodes_per_layer):
            for node, (members, _) in enumerate(nodes):
                labels = gpu_labels(layer, node, r, balanced)
                kept += kept_affinity(affinity_LEE[layer][np.ix_(members, members)], labels)
                sizes = np.bincount(labels, minlength=gpus)
                squared += float(((sizes - len(members) // gpus) ** 2).sum())
                count += gpus
        return float(np.sqrt(squared / count)), kept / total if total > 0 else 0.0

    if equal_sizes:
        chosen: float | None = None
        curve: tuple[tuple[float, float, float], ...] = ()
    else:
        points = [(r, *evaluate(r)) for r in candidates]
        curve = tuple(points)
        chosen = points[knee_index([p[1] for p in points], [p[2] for p in points])][0]

    expert2rank_LE = np.empty((len(affinity_LEE), num_experts), dtype=np.int64)
    for layer, nodes in enumerate(nodes_per_layer):
        for node, (members, _) in enumerate(nodes):
            expert2rank_LE[layer, members] = node * gpus + gpu_labels(layer, node, chosen, balancing)
    _, kept_gpu = evaluate(chosen, balancing)
    return GroupingResult(
        expert2rank_LE=expert2rank_LE,
        ratio=chosen,
        ratio_curve=curve,
        kept_node_affinity=kept_node / total if total > 0 else 0.0,
        kept_gpu_affinity=kept_gpu,
    )


def rebalance_primaries(
    expert2rank_E: np.ndarray,
    affinity_EE: np.ndarray,
    instance_load_ER: np.ndarray,
    replica_hosts_ER: np.ndarray,
    topology: Topology,
    *,
    ratio: float | None,
    max_experts_per_gpu: int | None,
    slack: float,
) -> np.ndarray:
    """Move primaries so that primaries plus the replicas already placed even out, nodes then GPUs.

    instance_load_ER is the expected load of every instance (primaries and replicas);
    replica_hosts_ER marks the replicas. Replica loads count as fixed offsets; a primary does not
    move to a node (or GPU) holding one of its replicas. Size bounds are those of the grouping.
    """
    num_experts = len(expert2rank_E)
    num_nodes, gpus = topology.num_nodes, topology.gpus_per_node
    primary_load_E = instance_load_ER[np.arange(num_experts), expert2rank_E]
    replica_load_R = (instance_load_ER * replica_hosts_ER).sum(axis=0)
    replica_on_node_EN = replica_hosts_ER.reshape(num_experts, num_nodes, gpus).any(axis=2)
    node_lo, node_hi = _node_bounds(num_experts, topology, max_experts_per_gpu, False)
    node_labels = balance_group_loads(
        expert2rank_E // gpus,
        affinity_EE,
        primary_load_E,
        num_groups=num_nodes,
        min_size=node_lo,
        max_size=node_hi,
        slack=slack,
        offset_G=replica_load_R.reshape(num_nodes, gpus).sum(axis=1),
        forbidden_nG=replica_on_node_EN,
    )
    result = np.empty(num_experts, dtype=np.int64)
    for node in range(num_nodes):
        members = np.flatnonzero(node_labels == node)
        ranks = topology.ranks_of_node(node)
        offset = replica_load_R[ranks].copy()
        local = np.where(expert2rank_E[members] // gpus == node, expert2rank_E[members] % gpus, -1)
        fill = offset + np.bincount(
            local[local >= 0], weights=primary_load_E[members][local >= 0], minlength=gpus
        )
        for i in np.flatnonzero(local < 0)[np.argsort(-primary_load_E[members][local < 0], kind="stable")]:
            free = np.flatnonzero(~replica_hosts_ER[members[i], ranks])
            local[i] = int(free[np.argmin(fill[free])]) if len(free) else int(np.argmin(fill))
            fill[local[i]] += primary_load_E[members[i]]
        lo, hi = (
            (len(members) // gpus, -(-len(members) // gpus))
            if ratio is None
            else gpu_size_bounds(len(members), gpus, ratio, max_experts_per_gpu)
        )
        sub = affinity_EE[np.ix_(members, members)]
        local = repair_group_sizes(local, sub, num_groups=gpus, min_size=lo, max_size=hi)
        local = balance_group_loads(
            local,
            sub,
            primary_load_E[members],
            num_groups=gpus,
            min_size=lo,
            max_size=hi,
            slack=slack,
            offset_G=offset,
            forbidden_nG=replica_hosts_ER[np.ix_(members, ranks)],
        )
        result[members] = node * gpus + local
    return result


class NodeDeal:
    """One node's experts dealt to its GPUs, heaviest first (``spread_within_nodes``).

    ``place(expert, level_G)`` puts the next expert on the open GPU with the lowest level_G +
    anti_affinity x (co-activation with the experts already there, in units of the expert's load);
    every GPU ends with floor or ceil(n / G) of the node's n experts (equal replica room). Ties: lower
    GPU."""

    def __init__(
        self,
        members: np.ndarray,
        loads_E: np.ndarray,
        affinity_EE: np.ndarray,
        gpus: int,
        *,
        anti_affinity: float = 1.0,
    ) -> None:
        self.order = members[np.lexsort((members, -loads_E[members]))]
        self._loads, self._affinity, self._anti = loads_E, affinity_EE, anti_affinity
        self._row_total = affinity_EE.sum(axis=1)
        self._high = -(-len(members) // gpus)
        self._full_allowed = len(members) - (self._high - 1) * gpus  # GPUs that may take `high` experts
        self._count = np.zeros(gpus, dtype=np.int64)
        self._placed: list[list[int]] = [[] for _ in range(gpus)]

    def place(self, expert: int, level_G: np.ndarray) -> int:
        """The GPU (0..G-1 in the node) that takes `expert`."""
        total = self._row_total[expert]
        scale = self._loads[expert] / total if total > 0 else 0.0
        together_G = np.array(
            [self._affinity[expert, placed].sum() * scale if placed else 0.0 for placed in self._placed]
        )
        count, high = self._count, self._high
        at_high = int((count == high).sum())
        open_G = (count < high - 1) | ((count == high - 1) & (at_high < self._full_allowed))
        g = int(np.argmin(np.where(open_G, level_G + self._anti * together_G, np.inf)))
        self._placed[g].append(int(expert))
        count[g] += 1
        return g


def spread_within_nodes(
    expert2rank_E: np.ndarray,
    loads_E: np.ndarray,
    affinity_EE: np.ndarray,
    topology: Topology,
    *,
    anti_affinity: float = 1.0,
) -> np.ndarray:
    """Keep every expert's node, re-deal each node's experts over its GPUs for robust balance.

    Co-activated experts' loads rise and fall together on new traffic; grouped on one GPU they move
    its load together. Node-level grouping is what saves cross-node copies, so here, node by node,
    experts go heaviest first to the GPU with the lowest load + ``anti_affinity`` x (co-activation
    with the experts already there, in units of load), every GPU taking floor or ceil(n / G) of the
    node's n experts (equal replica room; ``NodeDeal``). Deterministic (ties: lower id, lower GPU).
    """
    gpus = topology.gpus_per_node
    result = np.asarray(expert2rank_E, dtype=np.int64).copy()
    loads = np.asarray(loads_E, dtype=np.float64)
    for node, members in enumerate(np.flatnonzero(result // gpus == n) for n in range(topology.num_nodes)):
        deal = NodeDeal(members, loads, affinity_EE, gpus, anti_affinity=anti_affinity)
        fill_G = np.zeros(gpus)
        for expert in deal.order:
            g = deal.place(expert, fill_G)
            fill_G[g] += loads[expert]
            result[expert] = node * gpus + g
    return result
