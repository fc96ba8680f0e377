import numpy as np
import pytest

from ds_grace.planning.metrics import expected_gpu_loads
from ds_grace.planning.plan import LayerPlan
from ds_grace.planning.replication import (
    ReplicationError,
    instance_loads,
    layer_plan_from,
    replan_layer,
    replicate,
)
from ds_grace.topology import Topology

TOPO = Topology(num_nodes=2, gpus_per_node=2)


def _hosts(plan: LayerPlan) -> np.ndarray:
    hosts = np.zeros((plan.num_experts, plan.num_ranks), dtype=bool)
    for rank, experts in enumerate(plan.slots):
        hosts[list(experts), rank] = True
    return hosts


def _check_layer(plan: LayerPlan, *, extra: int | None = None, cap: int | None = None) -> None:
    plan.validate()
    for rank, experts in enumerate(plan.slots):
        replicas = [e for e in experts if plan.primary[e] != rank]
        if extra is not None:
            assert len(replicas) <= extra
        if cap is not None:
            assert len(experts) <= cap


def test_paper_rule_replicates_hot_experts_of_the_heaviest_gpu():
    # rank 0 holds experts 0 (load 60) and 1 (10): W = [70, 10, 10, 10], rho = 70 / 25 = 2.8 -> n_rep = 2
    loads = np.array([60.0, 10.0, 10.0, 10.0, 10.0])
    primary = np.array([0, 0, 1, 2, 3])
    placement = replicate(loads, primary, TOPO, mode="paper")
    # W_max * n_rep / (1 + n_rep) = 46.7: expert 0 alone reaches it
    assert placement.replica_ranks[0] and len(placement.replica_ranks[0]) == 2
    assert all(not ranks for ranks in placement.replica_ranks[1:])
    assert 0 not in placement.replica_ranks[0]
    # paper weights are inversely proportional to the predicted (even split) GPU loads
    predicted = np.array([10.0 + 20.0, 10.0, 10.0, 10.0])
    for r in placement.replica_ranks[0]:
        predicted[r] += 20.0
    expected = predicted.mean() / predicted
    assert np.allclose(placement.rank_weights, expected / expected.mean())


def test_budget_mode_respects_slots_cap_and_never_duplicates():
    rng = np.random.default_rng(0)
    loads = rng.pareto(1.5, 16) * 100
    primary = np.arange(16) % 4
    for extra, cap in ((1, None), (2, None), (3, 5)):
        placement = replicate(loads, primary, TOPO, extra_slots_per_gpu=extra, max_experts_per_gpu=cap)
        plan = layer_plan_from(primary, placement, num_ranks=4)
        _check_layer(plan, extra=extra, cap=cap)
        base = expected_gpu_loads(
            loads,
            layer_plan_from(primary, replicate(loads, primary, TOPO, extra_slots_per_gpu=0), num_ranks=4),
            TOPO,
            "tar",
        )
        after = expected_gpu_loads(loads, plan, TOPO, "tar")
        assert after.max() < base.max()


@pytest.mark.parametrize("policy", ["tar", "wrr", "primary"])
def test_planner_load_model_equals_route_table_expectation(policy):
    topo = Topology(num_nodes=3, gpus_per_node=2)
    rng = np.random.default_rng(1)
    for trial in range(5):
        loads = rng.uniform(0, 10, 9)
        primary = rng.integers(0, 6, 9)
        primary[:6] = np.arange(6)
        placement = replicate(loads, primary, topo, extra_slots_per_gpu=2, routing_policy=policy)
        plan = layer_plan_from(primary, placement, num_ranks=6)
        from_table = expected_gpu_loads(loads, plan, topo, policy)
        model = instance_loads(
            loads, _hosts(plan), np.asarray(placement.rank_weights), topo, policy, primary
        ).sum(axis=0)
        assert np.allclose(from_table, model), trial
        assert np.allclose(placement.predicted_gpu_loads, from_table)


def test_replan_with_unchanged_loads_moves_nothing_and_keeps_slots():
    loads = np.array([50.0, 5.0, 5.0, 20.0, 5.0, 5.0, 5.0, 5.0])
    primary = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    placement = replicate(loads, primary, TOPO, extra_slots_per_gpu=1)
    layer = layer_plan_from(primary, placement, num_ranks=4)
    again, moved = replan_layer(layer, loads, TOPO, extra_slots_per_gpu=1)
    assert moved.moved == 0
    assert again.slots == layer.slots and again.primary == layer.primary
    # new live loads: a replica may move, primaries and kept replicas keep their slot index
    shifted, placement2 = replan_layer(layer, loads[::-1].copy(), TOPO, extra_slots_per_gpu=1)
    assert shifted.primary == layer.primary
    for rank in range(4):
        primaries = [e for e in layer.slots[rank] if layer.primary[e] == rank]
        assert list(shifted.slots[rank][: len(primaries)]) == primaries
        for slot, e in enumerate(layer.slots[rank]):
            if e in shifted.slots[rank]:
                assert shifted.slots[rank].index(e) == slot or layer.primary[e] != rank
    assert placement2.moved <= placement2.num_replicas


def test_ties_prefer_a_previous_replica_then_a_node_without_a_copy():
    loads = np.array([40.0, 10.0, 10.0, 10.0])
    primary = np.array([0, 1, 2, 3])
    fresh = replicate(loads, primary, TOPO, extra_slots_per_gpu=1)
    assert fresh.replica_ranks[0][0] == 2  # node 1 gets its first copy; ranks 2 and 3 tie, lower wins
    again = replicate(loads, primary, TOPO, extra_slots_per_gpu=1, previous=[(0, 3)])
    assert again.replica_ranks[0][0] == 3 and again.moved == again.num_replicas - 1
    assert max(again.predicted_gpu_loads) == pytest.approx(max(fresh.predicted_gpu_loads))


def test_input_errors_name_the_argument():
    with pytest.raises(
        ReplicationError, match=r"grace.replication.mode \('lazy'\) must be 'paper' or 'budget'"
    ):
        replicate([1.0, 1.0], [0, 1], Topology(1, 2), mode="lazy")  # type: ignore[arg-type]
    with pytest.raises(ReplicationError, match=r"primary_E ranks must be in \[0, 2\)"):
        replicate([1.0, 1.0], [0, 5], Topology(1, 2))
    with pytest.raises(ReplicationError, match=r"max_experts_per_gpu \(1\) is below the 2 primaries"):
        replicate([1.0, 1.0, 1.0], [0, 0, 1], Topology(1, 2), max_experts_per_gpu=1)
