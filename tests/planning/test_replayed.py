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


def test_replayed_copies_from_the_schedule_equal_the_distinct_remote_count_on_a_real_trace():
    """The hop rows of ds_grace.comm.schedule.path_rows count what the distinct remote nodes / GPUs
    per token counted before (recomputed here from the same instance choices)."""
    import torch

    from ds_grace.routing import RouteTable, choose_instances
    from ds_grace.trace import load_mixtral_jsonl, packaged_traces_dir

    full = load_mixtral_jsonl(packaged_traces_dir() / "mixtral" / "humaneval_2_routing.jsonl", num_experts=8)
    trace = RoutingTrace(topk_ids=(full.topk_ids[0][:1001],), num_experts=8)
    topology = Topology(num_nodes=2, gpus_per_node=2)
    plan = build_plan(trace, topology=topology)
    ids_TK = trace.topk_ids[0]
    origin_T = origin_ranks(len(ids_TK), topology.world_size)
    table = RouteTable.build(plan.layers[0], topology, "tar")
    dest_TK = np.empty_like(ids_TK)
    for rank in range(topology.world_size):
        block = origin_T == rank
        dest_TK[block] = choose_instances(table, torch.from_numpy(ids_TK[block]), origin_rank=rank)[0].numpy()

    def distinct_remote(dest, own):
        return np.mean([len(set(row) - {o}) for row, o in zip(dest.tolist(), own.tolist())])

    replayed = replayed_metrics(trace, plan, routing_policy="tar")
    assert replayed["cross_gpu_copies_replayed"] == pytest.approx(
        distinct_remote(dest_TK, origin_T), rel=1e-12
    )
    assert replayed["cross_node_copies_replayed"] == pytest.approx(
        distinct_remote(dest_TK // 2, origin_T // 2), rel=1e-12
    )
    assert 0 < replayed["cross_node_copies_replayed"] < replayed["cross_gpu_copies_replayed"]
