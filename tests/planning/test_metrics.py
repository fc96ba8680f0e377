import numpy as np
import pytest

from ds_grace.planning.metrics import METRIC_KEYS, evaluate_plan, expected_gpu_loads, routing_probabilities
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError
from ds_grace.topology import Topology
from ds_grace.trace import ExpertLoads, RoutingTrace

TOPO = Topology(num_nodes=2, gpus_per_node=2)
TRACE = RoutingTrace(topk_ids=(np.array([[0, 1], [0, 2]]),), num_experts=4)


def _plan(slots: list[list[int]], primary: list[int]) -> GracePlan:
    return GracePlan(
        topology=TOPO,
        layers=(LayerPlan.from_lists(slots=slots, primary=primary),),
        meta={"routing_policy": "tar"},
    )


def test_hand_computed_metrics_without_replicas():
    metrics = evaluate_plan(TRACE, _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))
    # token [0, 1]: both on node 0, remote for the 2 origins of node 1 -> 0.5; token [0, 2]: always 1
    assert metrics["cross_node_copies_per_token"] == pytest.approx(0.75)
    assert metrics["cross_gpu_copies_per_token"] == pytest.approx(1.5)
    assert metrics["vanilla_cross_node_copies_per_token"] == pytest.approx(1.0)
    # GPU loads [2, 1, 1, 0]
    assert metrics["balancedness"] == pytest.approx(0.5)
    assert metrics["max_gpu_load_ratio"] == pytest.approx(2.0)
    assert set(METRIC_KEYS) <= set(metrics)


def test_a_remote_replica_saves_cross_node_copies():
    metrics = evaluate_plan(TRACE, _plan([[0], [1], [2, 0], [3]], [0, 1, 2, 3]))
    # token [0, 2] from node 1 now finds both experts at home
    assert metrics["cross_node_copies_per_token"] == pytest.approx(0.5)
    loads = expected_gpu_loads(
        np.array([2.0, 1.0, 1.0, 0.0]), _plan([[0], [1], [2, 0], [3]], [0, 1, 2, 3]).layers[0], TOPO, "tar"
    )
    assert loads.tolist() == pytest.approx([1.0, 1.0, 2.0, 0.0])


def test_routing_probabilities_rows_sum_to_one():
    prob = routing_probabilities(
        LayerPlan.from_lists(
            slots=[[0, 1], [1], [2, 0], [3]],
            primary=[0, 1, 2, 3],
            slot_weights=[[3.0, 1.0], [1.0], [1.0, 1.0], [1.0]],
        ),
        TOPO,
        "wrr",
    )
    assert np.allclose(prob.sum(axis=2), 1.0)
    assert prob[3, 0].tolist() == pytest.approx([0.75, 0.0, 0.25, 0.0])


def test_loads_only_sources_give_null_copies():
    loads = ExpertLoads(loads=np.array([[2.0, 1.0, 1.0, 0.0]]), top_k=2)
    metrics = evaluate_plan(loads, _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))
    assert metrics["cross_node_copies_per_token"] is None and metrics["cross_gpu_copies_per_token"] is None
    assert metrics["balancedness"] == pytest.approx(0.5)
    assert metrics["vanilla_cross_node_copies_per_token"] == pytest.approx(1.0)
    no_k = evaluate_plan(np.array([[2.0, 1.0, 1.0, 0.0]]), _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))
    assert no_k["vanilla_cross_node_copies_per_token"] is None


def test_mismatched_trace_and_plan_is_an_error():
    other = RoutingTrace(topk_ids=(np.array([[0, 1]]), np.array([[0, 1]])), num_experts=4)
    with pytest.raises(PlanError, match="trace has 2 MoE layers but the plan has 1"):
        evaluate_plan(other, _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))
    wider = RoutingTrace(topk_ids=(np.array([[0, 5]]),), num_experts=6)
    with pytest.raises(PlanError, match="trace has 6 experts per layer but the plan has 4"):
        evaluate_plan(wider, _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))
