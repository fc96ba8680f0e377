"""Replayed metrics: tokens on origin GPUs by consecutive blocks, routed by the runtime's choice."""

import numpy as np
import pytest

from ds_grace.planning.build import build_plan
from ds_grace.planning.metrics import evaluate_plan
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError
from ds_grace.replayed import origin_ranks, replayed_metrics
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace, synthetic

TWO_NODES = Topology(num_nodes=2, gpus_per_node=1)


def _plan(slots, primary):
    layer = LayerPlan.from_lists(slots=slots, primary=primary)
    return GracePlan(topology=TWO_NODES, layers=(layer,), meta={"routing_policy": "tar"})


def test_origin_rule_is_consecutive_blocks():
    assert origin_ranks(10, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert np.ptp(np.bincount(origin_ranks(1001, 8))) <= 1


def test_hand_checked_replay_single_instance_and_tar_replica():
    trace = RoutingTrace(topk_ids=(np.zeros((4, 1), dtype=np.int64),), num_experts=2)  # all choose expert 0
    single = replayed_metrics(trace, _plan([[0], [1]], [0, 1]))
    assert single["balancedness_replayed"] == pytest.approx(0.5)  # loads [4, 0]
    assert single["cross_node_copies_replayed"] == pytest.approx(0.5)  # tokens 2, 3 start on node 1
    replicated = replayed_metrics(trace, _plan([[0], [0, 1]], [0, 1]))
    assert replicated["balancedness_replayed"] == pytest.approx(1.0)  # TAR keeps each origin local
    assert replicated["cross_node_copies_replayed"] == 0.0
    wrr = replayed_metrics(trace, _plan([[0], [0, 1]], [0, 1]), routing_policy="wrr")
    assert wrr["cross_node_copies_replayed"] > 0.0  # WRR ignores locality


def test_replay_agrees_with_expectations_where_there_is_no_choice():
    trace = synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=2000, seed=3)
    topology = Topology(num_nodes=2, gpus_per_node=2)
    plan = build_plan(trace, topology=topology, policy="contiguous")
    replayed, expected = replayed_metrics(trace, plan), evaluate_plan(trace, plan)
    assert replayed["balancedness_replayed"] == pytest.approx(expected["balancedness"], abs=1e-12)
    assert replayed["cross_node_copies_replayed"] == pytest.approx(
        expected["cross_node_copies_per_token"], abs=0.05
    )
    grace = build_plan(trace, topology=topology)
    replayed, expected = replayed_metrics(trace, grace), evaluate_plan(trace, grace)
    assert replayed["balancedness_replayed"] == pytest.approx(expected["balancedness"], abs=0.03)


def test_replay_needs_a_matching_per_token_trace():
    plan = _plan([[0], [1]], [0, 1])
    other = RoutingTrace(topk_ids=(np.zeros((4, 1), dtype=np.int64),), num_experts=3)
    with pytest.raises(PlanError, match="does not match the plan"):
        replayed_metrics(other, plan)
