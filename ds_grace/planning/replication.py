"""Expert replication (GRACE.md section 3) and WRR weights (section 4) as pure functions of one layer.

Shape legend: E experts, R ranks (GPUs), N nodes, G GPUs per node, X candidate rows.

``replicate(loads_E, primary_E, topology, ...)`` keeps the primary placement fixed and adds replicas:
- mode "paper": the paper's rule: rho = W_max / W_mean, n_rep = min(max(1, floor(rho)), D - 1); the
  heaviest GPU's experts, by load, until their load reaches W_max * n_rep / (1 + n_rep), each get
  n_rep replicas on the least-loaded GPUs (predicted with an even split); WRR weight of an instance
  = 1 / predicted load of its GPU.
- mode "budget": up to ``extra_slots_per_gpu`` replicas per GPU, placed one at a time where they
  lower the expected max GPU load most (ties within ``locality_tolerance``: keep a replica that
  exists in ``previous``, then put it where its co-activated experts are), then the per-GPU WRR
  weights are refined toward equal expected loads (beyond the paper).
Expected loads follow the routing policy exactly as the runtime's ``route_table`` applies it with
every origin GPU equally likely (``instance_loads``), so the planner balances what will run.
No GPU ever holds two instances of one expert, and no GPU exceeds ``max_experts_per_gpu`` slots.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ds_grace.planning.plan import LayerPlan, RoutingPolicy
from ds_grace.topology import Topology

ReplicationMode = Literal["paper", "budget"]
WEIGHT_REFINE_STEPS = 8
WEIGHT_BOUND = 1e3  # WRR weights stay within [1 / WEIGHT_BOUND, WEIGHT_BOUND] x their mean


class ReplicationError(ValueError):
    """Replication inputs are inconsistent (shapes, ranks, modes)."""


def instance_loads(
    loads_X: np.ndarray,
    hosts_XR: np.ndarray,
    weight_R: np.ndarray,
    topology: Topology,
    policy: RoutingPolicy,
    primary_X: np.ndarray | None = None,
) -> np.ndarray:
    """load_XR: expected load each instance receives, every origin rank equally likely.

    Row x describes one expert (load loads_X[x], instances where hosts_XR[x]). Under "tar" an origin
    hosting the expert keeps it, an origin whose node hosts it splits over that node's instances by
    weight, any other origin splits over all instances by weight; "wrr" always splits over all
    instances by weight; "primary" sends everything to primary_X.
    """
    hosts = hosts_XR.astype(np.float64)
    if policy == "primary":
        if primary_X is None:
            raise ReplicationError("primary_X is required for the 'primary' routing policy")
        out = np.zeros_like(hosts)
        out[np.arange(len(loads_X)), primary_X] = loads_X
        return out
    weighted_XR = hosts * weight_R[None, :]
    total_X = weighted_XR.sum(axis=1)
    if policy == "wrr":
        return loads_X[:, None] * weighted_XR / total_X[:, None]
    num_x, num_nodes, gpus = len(loads_X), topology.num_nodes, topology.gpus_per_node
    weighted_XNG = weighted_XR.reshape(num_x, num_nodes, gpus)
    node_weight_XN = weighted_XNG.sum(axis=2)
    hosted_XN = hosts.reshape(num_x, num_nodes, gpus).sum(axis=2)
    homeless_origins_X = gpus * (hosted_XN == 0).sum(axis=1)
    local_share_XNG = np.divide(
        (gpus - hosted_XN)[:, :, None] * weighted_XNG,
        node_weight_XN[:, :, None],
        out=np.zeros_like(weighted_XNG),
        where=node_weight_XN[:, :, None] > 0,
    )
    share_XR = (
        hosts
        + local_share_XNG.reshape(num_x, -1)
        + homeless_origins_X[:, None] * weighted_XR / total_X[:, None]
    )
    return loads_X[:, None] * share_XR / topology.world_size


@dataclass(frozen=True)
class ReplicaPlacement:
    """Replicas of one layer on top of fixed primaries.

    replica_ranks[e]: ranks of expert e's replicas (primary excluded), in placement order;
    rank_weights[r]: WRR weight of every instance on rank r; predicted_gpu_loads[r]: expected load of
    rank r under the routing policy; moved: replicas not present in ``previous``.
    """

    replica_ranks: tuple[tuple[int, ...], ...]
    rank_weights: tuple[float, ...]
    predicted_gpu_loads: tuple[float, ...]
    moved: int

    @property
    def num_replicas(self) -> int:
        return sum(len(ranks) for ranks in self.replica_ranks)

    def pairs(self) -> list[tuple[int, int]]:
        """(expert, rank) of every replica."""
        return [(e, r) for e, ranks in enumerate(self.replica_ranks) for r in ranks]


def _refine_weights(
    loads_E: np.ndarray,
    hosts_ER: np.ndarray,
    weight_R: np.ndarray,
    topology: Topology,
    policy: RoutingPolicy,
    primary_E: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicative updates of per-rank weights toward equal expected GPU loads; keeps the best.
    Every step clips the weights to [1 / WEIGHT_BOUND, WEIGHT_BOUND] x their mean."""
    best_w = weight_R
    best_gpu = instance_loads(loads_E, hosts_ER, weight_R, topology, policy, primary_E).sum(axis=0)
    if policy == "primary":
        return best_w, best_gpu
    gpu = best_gpu
    w = weight_R
    for _ in range(WEIGHT_REFINE_STEPS):
        mean = gpu.mean()
        w = w * np.sqrt(np.divide(mean, gpu, out=np.full_like(gpu, 2.0), where=gpu > 0))
        w = np.clip(w / w.mean(), 1.0 / WEIGHT_BOUND, WEIGHT_BOUND)
        gpu = instance_loads(loads_E, hosts_ER, w, topology, policy, primary_E).sum(axis=0)
        if (gpu.max(), float((gpu**2).sum())) < (best_gpu.max() - 1e-12 * mean, float((best_gpu**2).sum())):
            best_w, best_gpu = w, gpu
    return best_w, best_gpu


def _check_inputs(loads_E: np.ndarray, primary_E: np.ndarray, topology: Topology) -> None:
    if loads_E.ndim != 1 or primary_E.shape != loads_E.shape:
        raise ReplicationError(f"loads_E {loads_E.shape} and primary_E {primary_E.shape} must be [E] arrays")
    if not np.all(np.isfinite(loads_E)) or (loads_E < 0).any():
        raise ReplicationError("loads_E must be finite and >= 0")
    if primary_E.size and (primary_E.min() < 0 or primary_E.max() >= topology.world_size):
        raise ReplicationError(f"primary_E ranks must be in [0, {topology.world_size}) for {topology}")


def replicate(
    loads_E: Sequence[float] | np.ndarray,
    primary_E: Sequence[int] | np.ndarray,
    topology: Topology,
    *,
    mode: ReplicationMode = "budget",
    extra_slots_per_gpu: int = 1,
    max_experts_per_gpu: int | None = None,
    routing_policy: RoutingPolicy = "tar",
    affinity_EE: np.ndarray | None = None,
    previous: Iterable[tuple[int, int]] | None = None,
    initial: Iterable[tuple[int, int]] | None = None,
    locality_tolerance: float = 0.002,
    slots_per_gpu: int | Sequence[int] | np.ndarray | None = None,
    greedy: bool = True,
) -> ReplicaPlacement:
    """Replicas for one layer given per-expert loads and the fixed primary rank of every expert.

    ``previous`` lists (expert, rank) replicas currently deployed (online re-planning), preferred
    among near-equal choices so that few replicas move. ``initial`` lists (expert, rank) replicas
    placed first, as given (those that would duplicate an instance or break a limit are skipped);
    the modes then spend what is left. ``locality_tolerance`` is the fraction of
    the mean GPU load within which placements count as equally good in budget mode.

    ``slots_per_gpu`` (budget mode; equal memory): every GPU ends with exactly that many slots, its
    primaries plus replicas (or, given one count per rank, rank r ends with ``slots_per_gpu[r]``);
    ``extra_slots_per_gpu`` is then ignored. Slots the load-driven phases leave
    empty are filled (``_fill_slots``): the replica that raises the expected max GPU load least, among
    those within the tolerance the one whose co-activated experts share its node.
    """
    loads = np.asarray(loads_E, dtype=np.float64)
    primary = np.asarray(primary_E, dtype=np.int64)
    _check_inputs(loads, primary, topology)
    if mode not in ("paper", "budget"):
        raise ReplicationError(f"grace.replication.mode ({mode!r}) must be 'paper' or 'budget'")
    if extra_slots_per_gpu < 0:
        raise ReplicationError(f"grace.replication.extra_slots_per_gpu ({extra_slots_per_gpu}) must be >= 0")
    num_experts, world = len(loads), topology.world_size
    hosts = np.zeros((num_experts, world), dtype=bool)
    hosts[np.arange(num_experts), primary] = True
    slots_R = hosts.sum(axis=0)
    cap = np.inf if max_experts_per_gpu is None else max_experts_per_gpu
    if slots_R.max(initial=0) > cap:
        raise ReplicationError(
            f"grace.grouping.max_experts_per_gpu ({max_experts_per_gpu}) is below the {int(slots_R.max())} "
            "primaries already on one GPU"
        )
    if slots_per_gpu is not None:
        if mode != "budget":
            raise ReplicationError("grace.replication.slots_per_gpu applies to mode 'budget' only")
        if np.ndim(slots_per_gpu) == 0:
            if not num_experts >= slots_per_gpu >= slots_R.max(initial=0) or slots_per_gpu > cap:
                raise ReplicationError(
                    f"grace.replication.slots_per_gpu ({slots_per_gpu}) must be in [{int(slots_R.max(initial=0))} "
                    f"(primaries on the fullest GPU), min(E={num_experts}, max_experts_per_gpu={max_experts_per_gpu})]"
                )
        else:  # one count per rank (online re-planning keeps every GPU's slots)
            target_R = np.asarray(slots_per_gpu, dtype=np.int64)
            if target_R.shape != (world,):
                raise ReplicationError(
                    f"slots_per_gpu lists {target_R.size} slot counts; the topology ({topology}) has {world} ranks"
                )
            bad = np.flatnonzero((target_R < slots_R) | (target_R > num_experts) | (target_R > cap))
            if len(bad):
                r = int(bad[0])
                raise ReplicationError(
                    f"slots_per_gpu[{r}] ({int(target_R[r])}) must be in [{int(slots_R[r])} (primaries on rank "
                    f"{r}), min(E={num_experts}, max_experts_per_gpu={max_experts_per_gpu})]"
                )
            slots_per_gpu = target_R
        cap = slots_per_gpu
    previous_set = set() if previous is None else {(int(e), int(r)) for e, r in previous}
    order: list[tuple[int, int]] = []
    if slots_per_gpu is not None:
        extra_R = slots_per_gpu - slots_R
    else:
        extra_R = np.full(world, extra_slots_per_gpu if mode == "budget" else num_experts)
    for e, r in initial or ():
        if (
            0 <= e < num_experts
            and 0 <= r < world
            and not hosts[e, r]
            and slots_R[r] < np.broadcast_to(cap, (world,))[r]
            and extra_R[r] > 0
        ):
            hosts[e, r] = True
            slots_R[r] += 1
            extra_R[r] -= 1
            order.append((int(e), int(r)))
    weight = np.ones(world)
    if loads.sum() > 0 and world > 1 and greedy:
        if mode == "paper":
            weight = _paper(loads, primary, hosts, slots_R, cap, order)
        else:
            weight = _budget(
                loads,
                primary,
                hosts,
                slots_R,
                cap,
                order,
                topology=topology,
                policy=routing_policy,
                extra_R=extra_R,
                affinity=affinity_EE,
                previous=previous_set,
                tolerance=locality_tolerance,
            )
    if slots_per_gpu is not None:
        _fill_slots(
            loads,
            primary,
            hosts,
            slots_R,
            order,
            slots_per_gpu=slots_per_gpu,
            topology=topology,
            policy=routing_policy,
            weight=weight,
            affinity=affinity_EE,
            tolerance=locality_tolerance,
        )
    if mode == "budget":
        weight, gpu = _refine_weights(loads, hosts, weight, topology, routing_policy, primary)
    else:
        gpu = instance_loads(loads, hosts, weight, topology, routing_policy, primary).sum(axis=0)
    replica_ranks: list[list[int]] = [[] for _ in range(num_experts)]
    for e, r in order:
        replica_ranks[e].append(r)
    return ReplicaPlacement(
        replica_ranks=tuple(tuple(ranks) for ranks in replica_ranks),
        rank_weights=tuple(float(w) for w in weight / weight.mean()),
        predicted_gpu_loads=tuple(float(x) for x in gpu),
        moved=sum((e, r) not in previous_set for e, r in order),
    )


def _paper(
    loads: np.ndarray,
    primary: np.ndarray,
    hosts: np.ndarray,
    slots_R: np.ndarray,
    cap: float,
    order: list[tuple[int, int]],
) -> np.ndarray:
    world = hosts.shape[1]
    gpu = np.bincount(primary, weights=loads, minlength=world)
    heaviest = int(np.argmax(gpu))
    rho = gpu[heaviest] / gpu.mean()
    n_rep = min(max(1, int(np.floor(rho))), world - 1)
    members = np.flatnonzero(primary == heaviest)
    members = members[np.lexsort((members, -loads[members]))]
    cumulative = np.cumsum(loads[members])
    goal = gpu[heaviest] * n_rep / (1 + n_rep)
    hot = members[: int(np.searchsorted(cumulative, goal - 1e-12 * gpu[heaviest])) + 1]
    predicted = gpu.copy()
    for e in hot:
        free = np.flatnonzero(~hosts[e] & (slots_R < cap))
        targets = free[np.lexsort((free, predicted[free]))][:n_rep]
        if len(targets) == 0:
            continue
        share = loads[e] / (len(targets) + 1)
        predicted[heaviest] -= loads[e] - share
        predicted[targets] += share
        for r in targets:
            hosts[e, r] = True
            slots_R[r] += 1
            order.append((int(e), int(r)))
    return np.divide(predicted.mean(), predicted, out=np.ones_like(predicted), where=predicted > 0)


def _budget(
    loads: np.ndarray,
    primary: np.ndarray,
    hosts: np.ndarray,
    slots_R: np.ndarray,
    cap: float,
    order: list[tuple[int, int]],
    *,
    topology: Topology,
    policy: RoutingPolicy,
    extra_R: np.ndarray,
    affinity: np.ndarray | None,
    previous: set[tuple[int, int]],
    tolerance: float,
) -> np.ndarray:
    """Phase 1: add the replica that lowers the expected max GPU load most, repeatedly.
    Phase 2: move a replica (off the heaviest GPU, or of an expert on it) where that lowers the max.
    Phase 3: slots left over go to nodes where the expert's co-activated experts are (saving
    cross-node copies) while the max GPU load rises by no more than the tolerance. Returns the
    per-rank WRR weights it ended with."""
    if policy == "primary":
        return np.ones(hosts.shape[1])
    num_experts, world = hosts.shape
    num_nodes, gpus = topology.num_nodes, topology.gpus_per_node
    node_of_R = np.arange(world) // gpus
    replicas_R = np.zeros(world, dtype=np.int64)
    previous_ER = np.zeros((num_experts, world), dtype=bool)
    for e, r in previous:
        if 0 <= e < num_experts and 0 <= r < world:
            previous_ER[e, r] = True
    hosted_EN = hosts.reshape(num_experts, num_nodes, gpus).any(axis=2)
    weight = np.ones(world)
    load_ER = instance_loads(loads, hosts, weight, topology, policy, primary)
    gpu = load_ER.sum(axis=0)
    slack = tolerance * gpu.mean()
    scale = 1e-12 * max(gpu.mean(), 1e-300)

    def row_loads(e: int, hosts_R: np.ndarray) -> np.ndarray:
        return instance_loads(
            loads[e : e + 1], hosts_R[None, :], weight, topology, policy, primary[e : e + 1]
        )[0]

    def closeness_EN(rows: np.ndarray) -> np.ndarray:
        """Co-activation of experts `rows` with the experts each node hosts (load without A)."""
        if affinity is None:
            return np.repeat(loads[rows][:, None], num_nodes, axis=1)
        return affinity[rows] @ hosted_EN

    def best_addition(base_gpu: np.ndarray, room_R: np.ndarray, skip: tuple[int, int] | None = None):
        """The replica that lowers max (then sum of squares) of base_gpu most; within the tolerance
        a kept replica first, then a node without a copy, then co-activated neighbours. None if
        nothing improves."""
        heaviest = int(np.argmax(base_gpu))
        experts = np.flatnonzero((load_ER[:, heaviest] > 0) | hosts[:, heaviest])
        rows_e, cand_t = np.nonzero(~hosts[experts] & room_R[None, :])
        cand_e = experts[rows_e]
        if skip is not None:
            keep = ~((cand_e == skip[0]) & (cand_t == skip[1]))
            cand_e, cand_t = cand_e[keep], cand_t[keep]
        if len(cand_e) == 0:
            return None
        cand_hosts = hosts[cand_e].copy()
        cand_hosts[np.arange(len(cand_e)), cand_t] = True
        new_XR = instance_loads(loads[cand_e], cand_hosts, weight, topology, policy, primary[cand_e])
        gpu_XR = base_gpu[None, :] - load_ER[cand_e] + new_XR
        new_max = gpu_XR.max(axis=1)
        new_sq = (gpu_XR**2).sum(axis=1)
        base_max, base_sq = base_gpu.max(), float((base_gpu**2).sum())
        improves = (new_max < base_max - scale) | (
            (new_max <= base_max + scale) & (new_sq < base_sq * (1 - 1e-12))
        )
        if not improves.any():
            return None
        pick = np.flatnonzero(improves & (new_max <= new_max[improves].min() + slack))
        close = closeness_EN(cand_e[pick])[np.arange(len(pick)), node_of_R[cand_t[pick]]]
        kept = previous_ER[cand_e[pick], cand_t[pick]]
        new_node = ~hosted_EN[cand_e[pick], node_of_R[cand_t[pick]]]  # a first copy on that node
        best = int(pick[np.lexsort((pick, new_sq[pick], -close, ~new_node, ~kept))[0]])
        return int(cand_e[best]), int(cand_t[best]), new_XR[best], gpu_XR[best]

    def place(e: int, t: int, new_R: np.ndarray) -> None:
        nonlocal gpu, load_ER, weight
        hosts[e, t] = hosted_EN[e, node_of_R[t]] = True
        slots_R[t] += 1
        replicas_R[t] += 1
        order.append((e, t))
        load_ER[e] = new_R
        gpu = load_ER.sum(axis=0)
        # one damped step toward weights inversely proportional to GPU load; kept if it helps
        trial = weight * np.sqrt(np.divide(gpu.mean(), gpu, out=np.full(world, 2.0), where=gpu > 0))
        trial /= trial.mean()
        trial_ER = instance_loads(loads, hosts, trial, topology, policy, primary)
        trial_gpu = trial_ER.sum(axis=0)
        if trial_gpu.max() < gpu.max():
            weight, load_ER, gpu = trial, trial_ER, trial_gpu

    def unplace(e: int, t: int, new_R: np.ndarray) -> None:
        nonlocal gpu
        hosts[e, t] = False
        hosted_EN[e, node_of_R[t]] = hosts[e, node_of_R == node_of_R[t]].any()
        slots_R[t] -= 1
        replicas_R[t] -= 1
        order.remove((e, t))
        load_ER[e] = new_R
        gpu = load_ER.sum(axis=0)

    def room() -> np.ndarray:
        return (replicas_R < extra_R) & (slots_R < cap)

    while (found := best_addition(gpu, room())) is not None:  # phase 1
        place(found[0], found[1], found[2])

    for _ in range(len(order)):  # phase 2
        heaviest, current = int(np.argmax(gpu)), gpu.max()
        best_move = None
        for e, r in [(e, r) for e, r in order if r == heaviest or hosts[e, heaviest]]:
            without = hosts[e].copy()
            without[r] = False
            row = row_loads(e, without)
            saved = load_ER[e].copy()
            hosts[e, r] = False
            load_ER[e] = row
            freed = room()
            freed[r] = slots_R[r] - 1 < np.broadcast_to(cap, (world,))[r]
            found = best_addition(gpu - saved + row, freed, skip=(e, r))
            hosts[e, r] = True
            load_ER[e] = saved
            if (
                found is not None
                and found[3].max() < current - scale
                and (best_move is None or found[3].max() < best_move[1][3].max())
            ):
                best_move = ((e, r, row), found)
        if best_move is None:
            break
        (e, r, row), (add_e, add_t, add_row, _) = best_move
        unplace(e, r, row)
        place(
            add_e,
            add_t,
            add_row if add_e != e else row_loads(add_e, hosts[add_e] | (np.arange(world) == add_t)),
        )

    limit = gpu.max() + slack
    shortlist_size = 2 * num_nodes
    while True:  # phase 3: locality with the slots left
        room_R = room()
        room_N = room_R.reshape(num_nodes, gpus).any(axis=1)
        score_EN = closeness_EN(np.arange(num_experts))
        open_EN = ~hosted_EN & room_N[None, :] & (loads[:, None] > 0)
        if not open_EN.any():
            return weight
        pair_e, pair_n = np.nonzero(open_EN)
        top = np.lexsort((np.arange(len(pair_e)), -score_EN[pair_e, pair_n]))[:shortlist_size]
        pair_e, pair_n = pair_e[top], pair_n[top]
        cand_e = np.repeat(pair_e, gpus)
        cand_t = (pair_n[:, None] * gpus + np.arange(gpus)[None, :]).ravel()
        usable = room_R[cand_t]
        cand_e, cand_t = cand_e[usable], cand_t[usable]
        close = score_EN[cand_e, node_of_R[cand_t]]
        cand_hosts = hosts[cand_e].copy()
        cand_hosts[np.arange(len(cand_e)), cand_t] = True
        new_XR = instance_loads(loads[cand_e], cand_hosts, weight, topology, policy, primary[cand_e])
        new_max = (gpu[None, :] - load_ER[cand_e] + new_XR).max(axis=1)
        allowed = np.flatnonzero(new_max <= limit)
        if len(allowed) == 0:
            return weight
        kept = previous_ER[cand_e[allowed], cand_t[allowed]]
        best = int(allowed[np.lexsort((allowed, new_max[allowed], -close[allowed], ~kept))[0]])
        place(int(cand_e[best]), int(cand_t[best]), new_XR[best])


def _fill_slots(
    loads: np.ndarray,
    primary: np.ndarray,
    hosts: np.ndarray,
    slots_R: np.ndarray,
    order: list[tuple[int, int]],
    *,
    slots_per_gpu: int,
    topology: Topology,
    policy: RoutingPolicy,
    weight: np.ndarray,
    affinity: np.ndarray | None,
    tolerance: float,
) -> None:
    """Fill every GPU up to slots_per_gpu: one replica at a time, the one whose expected max GPU load
    is lowest (within tolerance x the mean: the closest to its co-activated experts' node, then a
    node without a copy, then the lowest sum of squares)."""
    num_experts, world = hosts.shape
    num_nodes, gpus = topology.num_nodes, topology.gpus_per_node
    node_of_R = np.arange(world) // gpus
    eval_policy: RoutingPolicy = "tar" if policy == "primary" else policy
    while (slots_R < slots_per_gpu).any():
        load_ER = instance_loads(loads, hosts, weight, topology, eval_policy, primary)
        gpu = load_ER.sum(axis=0)
        cand_e, cand_t = np.nonzero(~hosts & (slots_R < slots_per_gpu)[None, :])
        cand_hosts = hosts[cand_e].copy()
        cand_hosts[np.arange(len(cand_e)), cand_t] = True
        new_XR = instance_loads(loads[cand_e], cand_hosts, weight, topology, eval_policy, primary[cand_e])
        gpu_XR = gpu[None, :] - load_ER[cand_e] + new_XR
        new_max, new_sq = gpu_XR.max(axis=1), (gpu_XR**2).sum(axis=1)
        hosted_EN = hosts.reshape(num_experts, num_nodes, gpus).any(axis=2)
        if affinity is None:
            close = loads[cand_e]
        else:
            close = (affinity[cand_e] @ hosted_EN)[np.arange(len(cand_e)), node_of_R[cand_t]]
        new_node = ~hosted_EN[cand_e, node_of_R[cand_t]]
        pick = np.flatnonzero(new_max <= new_max.min() + tolerance * max(gpu.mean(), 1e-300))
        best = int(pick[np.lexsort((pick, new_sq[pick], ~new_node[pick], -close[pick]))[0]])
        e, t = int(cand_e[best]), int(cand_t[best])
        hosts[e, t] = True
        slots_R[t] += 1
        order.append((e, t))


def seed_replicas(
    loads_E: np.ndarray,
    primary: np.ndarray,
    topology: Topology,
    extra: int,
    cap: int | None,
    slots: int | Sequence[int] | np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """Load-only replica guess for the joint refinement: copies go, one at a time, to the expert
    with the largest load per copy (as EPLB counts them), each on the least-loaded GPU of a node
    that does not yet hold that expert (else any node), so primaries can make room around them.
    ``slots`` (one count, or one per rank): fill every GPU to it."""
    world, gpus = topology.world_size, topology.gpus_per_node
    copies = np.ones(len(loads_E))
    hosts = np.zeros((len(loads_E), world), dtype=bool)
    hosts[np.arange(len(loads_E)), primary] = True
    if slots is not None:  # equal memory: fill every GPU to `slots`
        free_R = slots - np.bincount(primary, minlength=world)
    elif cap is None:
        free_R = np.full(world, extra)
    else:
        free_R = np.minimum(extra, cap - np.bincount(primary, minlength=world))
    gpu = np.bincount(primary, weights=loads_E, minlength=world)
    pairs: list[tuple[int, int]] = []
    while free_R.sum() > 0:
        e = int(np.argmax(np.where(hosts.sum(axis=1) < world, loads_E / copies, -1.0)))
        node_has = hosts[e].reshape(topology.num_nodes, gpus).any(axis=1)
        open_R = (free_R > 0) & ~hosts[e]
        preferred = open_R & ~np.repeat(node_has, gpus)
        targets = np.flatnonzero(preferred if preferred.any() else open_R)
        if loads_E[e] <= 0 or len(targets) == 0:
            break
        t = int(targets[np.argmin(gpu[targets])])
        _add_copy(e, t, loads_E=loads_E, copies=copies, hosts=hosts, free_R=free_R, gpu=gpu, pairs=pairs)
    return pairs


def slot_lists(
    primary_E: Sequence[int] | np.ndarray,
    placement: ReplicaPlacement,
    *,
    num_ranks: int,
    previous_slots: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Per-rank slot lists: primaries first, then replicas.

    With ``previous_slots`` (the layer's current slot lists), primaries keep their slot order and a
    replica that stays keeps its slot index where it can, so the runtime moves as little as possible.
    """
    primary = np.asarray(primary_E, dtype=np.int64)
    replicas: list[list[int]] = [[] for _ in range(num_ranks)]
    for e, ranks in enumerate(placement.replica_ranks):
        for r in ranks:
            replicas[r].append(e)
    slots: list[list[int]] = []
    for rank in range(num_ranks):
        primaries = sorted(np.flatnonzero(primary == rank).tolist())
        if previous_slots is None:
            slots.append(primaries + sorted(replicas[rank]))
            continue
        old = list(previous_slots[rank])
        own = set(primaries)
        ordered_primaries = [e for e in old if e in own] + [e for e in primaries if e not in set(old)]
        old_replicas = [e for e in old if e not in own]
        new = set(replicas[rank])
        kept = [e if e in new else None for e in old_replicas]
        incoming = [e for e in sorted(new) if e not in set(old_replicas)]
        merged = [e if e is not None else (incoming.pop(0) if incoming else None) for e in kept]
        slots.append(ordered_primaries + [e for e in merged if e is not None] + incoming)
    return slots


def layer_plan_from(
    primary_E: Sequence[int] | np.ndarray,
    placement: ReplicaPlacement,
    *,
    num_ranks: int,
    previous_slots: Sequence[Sequence[int]] | None = None,
) -> LayerPlan:
    """A LayerPlan holding the primaries, the replicas and the per-rank WRR weights."""
    slots = slot_lists(primary_E, placement, num_ranks=num_ranks, previous_slots=previous_slots)
    return LayerPlan.from_lists(
        slots=slots,
        primary=[int(r) for r in np.asarray(primary_E)],
        slot_weights=[[placement.rank_weights[r]] * len(s) for r, s in enumerate(slots)],
    )


def replan_layer(
    layer: LayerPlan,
    loads_E: Sequence[float] | np.ndarray,
    topology: Topology,
    *,
    mode: ReplicationMode = "budget",
    extra_slots_per_gpu: int = 1,
    max_experts_per_gpu: int | None = None,
    routing_policy: RoutingPolicy = "tar",
    affinity_EE: np.ndarray | None = None,
    slots_per_gpu: int | Sequence[int] | np.ndarray | None = None,
) -> tuple[LayerPlan, ReplicaPlacement]:
    """Re-place one layer's replicas for new loads, primaries fixed, moving few replicas.

    For the online re-planner: returns the new LayerPlan (kept replicas keep their slot index) and
    the placement (its ``moved`` counts replicas to copy onto new ranks). ``slots_per_gpu`` (budget
    mode): the slots every rank ends with, one count or one per rank (``replicate``).
    """
    if layer.num_ranks != topology.world_size:
        raise ReplicationError(
            f"layer has {layer.num_ranks} ranks but the topology ({topology}) has {topology.world_size}"
        )
    primary = np.array(layer.primary, dtype=np.int64)
    current = [(e, r) for r, experts in enumerate(layer.slots) for e in experts if layer.primary[e] != r]
    options = dict(
        mode=mode,
        extra_slots_per_gpu=extra_slots_per_gpu,
        max_experts_per_gpu=max_experts_per_gpu,
        routing_policy=routing_policy,
        affinity_EE=affinity_EE,
        slots_per_gpu=slots_per_gpu,
    )
    placement = replicate(loads_E, primary, topology, previous=current, **options)
    if slots_per_gpu is not None and mode == "budget":
        # every slot gets used: the greedy's last replicas are forced, so also try EPLB's per-copy
        # seeding of all of them and keep whichever predicts the lower max GPU load
        loads = np.asarray(loads_E, dtype=np.float64)
        seeds = seed_replicas(loads, primary, topology, 0, max_experts_per_gpu, slots_per_gpu)
        seeded = replicate(loads, primary, topology, previous=current, initial=seeds, greedy=False, **options)
        if max(seeded.predicted_gpu_loads) < max(placement.predicted_gpu_loads) * (1 - 1e-9):
            placement = seeded
    plan = layer_plan_from(primary, placement, num_ranks=topology.world_size, previous_slots=layer.slots)
    return plan, placement


def share_gpu_loads(
    loads_E: np.ndarray,
    hosts_ER: np.ndarray,
    topology: Topology,
    *,
    policy: RoutingPolicy = "tar",
    weight_R: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(gpu_R, share_ER): expected GPU loads when instance (e, r) receives the fraction share_ER of
    expert e's tokens (the instance choice of `policy` with weights weight_R, default 1)."""
    weight = np.ones(topology.world_size) if weight_R is None else weight_R
    share_ER = instance_loads(np.ones(len(loads_E)), hosts_ER, weight, topology, policy)
    return (loads_E[:, None] * share_ER).sum(axis=0), share_ER


def _add_copy(
    e: int,
    t: int,
    *,
    loads_E: np.ndarray,
    copies: np.ndarray,
    hosts: np.ndarray,
    free_R: np.ndarray,
    gpu: np.ndarray,
    pairs: list[tuple[int, int]],
) -> None:
    """Put one more copy of expert e on GPU t: its load splits evenly over its copies."""
    copies[e] += 1
    hosts[e, t] = True
    free_R[t] -= 1
    gpu[t] += loads_E[e] / copies[e]
    pairs.append((e, t))


def _nodes_missing(ids_TK: np.ndarray, hosted_EN: np.ndarray) -> np.ndarray:
    """missing_NT: per node, how many of each token's experts have no instance there."""
    return (~hosted_EN[ids_TK]).sum(axis=1).T


def locality_swaps(
    loads_E: np.ndarray,
    primary: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    ids_TK: np.ndarray,
    topology: Topology,
    *,
    tolerance: float,
    policy: RoutingPolicy = "tar",
    weight_R: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """Replicas swapped, one slot at a time, to the expert whose copy on that slot's node lets the most
    sample tokens stay inside the node (tokens from that node whose experts are then all there: the
    cross-node copies it saves, per-node dedup), as long as the max expected GPU load stays within
    tolerance x the mean GPU load of where it started. Slot counts are unchanged."""
    num_experts, world = len(loads_E), topology.world_size
    num_nodes, gpus = topology.num_nodes, topology.gpus_per_node
    node_of_R = np.arange(world) // gpus
    hosts = np.zeros((num_experts, world), dtype=bool)
    hosts[np.arange(num_experts), primary] = True
    current = [(int(e), int(r)) for e, r in pairs]
    for e, r in current:
        hosts[e, r] = True

    def worst(hosts_ER: np.ndarray) -> float:
        return float(share_gpu_loads(loads_E, hosts_ER, topology, policy=policy, weight_R=weight_R)[0].max())

    def copies(hosts_ER: np.ndarray) -> int:
        missing_NT = _nodes_missing(ids_TK, hosts_ER.reshape(num_experts, num_nodes, gpus).any(axis=2))
        return int((missing_NT > 0).sum())

    limit = worst(hosts) + tolerance * float(loads_E.sum()) / world
    best_copies = copies(hosts)
    for _ in range(len(current)):
        hosted_EN = hosts.reshape(num_experts, num_nodes, gpus).any(axis=2)
        missing_NT = _nodes_missing(ids_TK, hosted_EN)
        found = None
        for index, (old, r) in enumerate(current):
            n = int(node_of_R[r])
            single = missing_NT[n] == 1
            gain_E = np.bincount(ids_TK[single][~hosted_EN[ids_TK[single], n]], minlength=num_experts)
            sole = hosts[old, node_of_R == n].sum() == 1
            loss = int((ids_TK[missing_NT[n] == 0] == old).sum()) if sole else 0
            order = np.argsort(-gain_E, kind="stable")
            for new in order[:4]:
                new = int(new)
                if gain_E[new] - loss <= 0 or hosted_EN[new, n] or loads_E[new] <= 0:
                    break
                trial = hosts.copy()
                trial[old, r], trial[new, r] = False, True
                if worst(trial) > limit:
                    continue
                count = copies(trial)
                if count < best_copies and (found is None or count < found[0]):
                    found = (count, index, new, trial)
        if found is None:
            break
        best_copies, index, new, hosts = found
        current[index] = (new, current[index][1])
    return current
