"""Balance at the scale of a forward (ds_grace.planning.batch_balance): the fast expected loads and
copies equal the planner's metrics, resampled batches keep whole tokens, and slot swaps lower the cost
without breaking the plan's rules."""

from __future__ import annotations

import numpy as np
import pytest

from ds_grace.planning.batch_balance import (
    BATCH_SAMPLES,
    BatchObjective,
    cross_node_copies,
    expected_shares,
    resampled_loads,
    routed_weights,
    swap_refine,
)
from ds_grace.planning.build import build_plan
from ds_grace.planning.metrics import evaluate_plan, routing_probabilities
from ds_grace.planning.plan import GracePlan, LayerPlan
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace, synthetic

TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2)
TRACE = synthetic(num_layers=2, num_experts=12, top_k=2, num_tokens=600, skew=0.8, co_activation=0.8, seed=3)


@pytest.fixture(scope="module")
def plan() -> GracePlan:
    return build_plan(TRACE, topology=TOPOLOGY)


@pytest.mark.parametrize("policy", ["tar", "wrr", "primary"])
def test_expected_shares_and_copies_equal_the_planner_metrics(plan, policy):
    for index, layer in enumerate(plan.layers):
        weight_RE = routed_weights(layer, policy)
        shares = expected_shares(weight_RE, TOPOLOGY.gpus_per_node, policy)
        assert shares == pytest.approx(routing_probabilities(layer, TOPOLOGY, policy).mean(axis=0))
        one = RoutingTrace(topk_ids=(TRACE.topk_ids[index],), num_experts=TRACE.num_experts)
        single = GracePlan(topology=TOPOLOGY, layers=(layer,))
        expected = evaluate_plan(one, single, routing_policy=policy)["cross_node_copies_per_token"]
        copies = cross_node_copies(weight_RE, TOPOLOGY.gpus_per_node, policy, TRACE.topk_ids[index])
        assert copies == pytest.approx(expected)


def test_resampled_batches_hold_whole_tokens():
    ids_TK = np.array([[0, 1], [2, 3], [0, 3]])
    loads_BE = resampled_loads(ids_TK, 5, batch_tokens=2, seed=0)
    assert loads_BE.shape == (BATCH_SAMPLES, 5) and (loads_BE.sum(axis=1) == 4).all()
    assert (loads_BE[:, 4] == 0).all() and (
        loads_BE[:, 0] + loads_BE[:, 2] == loads_BE[:, 1] + loads_BE[:, 3]
    ).all()
    # a batch larger than the window draws the window's size; the same seed draws the same batches
    assert (resampled_loads(ids_TK, 5, batch_tokens=9, seed=1).sum(axis=1) == 6).all()
    assert (resampled_loads(ids_TK, 5, batch_tokens=2, seed=0) == loads_BE).all()


def test_swaps_split_experts_chosen_together_and_keep_the_plan_valid():
    """Experts 0 and 1 are always chosen together and share GPU 0, as a grouping would place them: every
    batch loads GPU 0 twice. Swapping one of them with a cold expert of the same node halves that."""
    topology = Topology(num_nodes=1, gpus_per_node=2)
    layer = LayerPlan.from_lists(slots=[[0, 1], [2, 3]], primary=[0, 0, 1, 1])
    rng = np.random.default_rng(0)
    ids_TK = np.where(rng.random((400, 1)) < 0.5, [[0, 1]], [[2, 3]])
    objective = BatchObjective.of_window(ids_TK, 4, topology, "tar", batch_tokens=8)
    refined = swap_refine(layer, objective)
    assert objective.cost(routed_weights(refined, "tar")) < objective.cost(routed_weights(layer, "tar"))
    assert sorted(map(sorted, refined.slots)) in ([[0, 2], [1, 3]], [[0, 3], [1, 2]])
    assert all(refined.primary[e] in [r for r, s in enumerate(refined.slots) if e in s] for e in range(4))


def test_swaps_keep_slot_counts_one_copy_per_gpu_and_the_copies_bound(plan):
    layer = plan.layers[0]
    objective = BatchObjective.of_window(
        TRACE.topk_ids[0], TRACE.num_experts, TOPOLOGY, "tar", batch_tokens=16
    )
    start_copies, _ = objective.scores(routed_weights(layer, "tar"))
    refined = swap_refine(layer, objective, max_copies=start_copies)
    assert [len(s) for s in refined.slots] == [len(s) for s in layer.slots]
    assert all(len(set(s)) == len(s) for s in refined.slots)
    assert sorted(e for s in refined.slots for e in s) == sorted(e for s in layer.slots for e in s)
    copies, _ = objective.scores(routed_weights(refined, "tar"))
    assert copies <= start_copies + 1e-12
    assert objective.cost(routed_weights(refined, "tar")) <= objective.cost(routed_weights(layer, "tar"))


def test_every_swap_scored_at_once_equals_scoring_it_alone(plan):
    layer = plan.layers[1]
    objective = BatchObjective.of_window(
        TRACE.topk_ids[1], TRACE.num_experts, TOPOLOGY, "tar", batch_tokens=32
    )
    routed_RE = routed_weights(layer, "tar")
    for a, b in ((0, 1), (1, 2)):  # inside a node, across nodes
        experts_I, experts_J = np.array(layer.slots[a]), np.array(layer.slots[b])
        balance_IJ = objective.swap_balances(
            routed_RE, objective.gpu_loads(routed_RE), a, experts_I, b, experts_J
        )
        for (i, j), value in np.ndenumerate(balance_IJ):
            ea, eb = experts_I[i], experts_J[j]
            if ea in layer.slots[b] or eb in layer.slots[a]:
                continue
            moved_RE = routed_RE.copy()
            moved_RE[b, ea], moved_RE[a, ea] = routed_RE[a, ea], 0.0
            moved_RE[a, eb], moved_RE[b, eb] = routed_RE[b, eb], 0.0
            assert value == pytest.approx(objective.scores(moved_RE)[1])
