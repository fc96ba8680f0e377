"""Fewer experts than GPUs (E < R): Mixtral's 8 experts on 2 x 8 and 2 x 4 GPUs with S = 1 and 2 slots,
the routing tables, the EPLB export and the sharded loader (a rank reads only its slots)."""

from __future__ import annotations

import numpy as np
import pytest

from ds_grace.planning.build import build_plan
from ds_grace.planning.metrics import evaluate_plan
from ds_grace.planning.per_node import per_node_layer
from ds_grace.planning.plan import GracePlan, PlanError
from ds_grace.routing import RouteTable, choose_instances
from ds_grace.topology import Topology
from ds_grace.trace import load_mixtral_jsonl, packaged_traces_dir, synthetic

TRACES = packaged_traces_dir()


@pytest.fixture(scope="module")
def mixtral():
    return {
        name: load_mixtral_jsonl(TRACES / "mixtral" / f"{name}_2_routing.jsonl", num_experts=8)
        for name in ("gsm8k", "humaneval")
    }


@pytest.mark.parametrize("gpus", [8, 4])
@pytest.mark.parametrize("slots", [1, 2])
def test_mixtral_on_two_nodes_fills_every_gpu(mixtral, gpus, slots, tmp_path):
    topology = Topology(num_nodes=2, gpus_per_node=gpus)
    plan = build_plan(mixtral["gsm8k"], topology=topology, replication={"slots_per_gpu": slots})
    for layer in plan.layers:
        assert [len(s) for s in layer.slots] == [slots] * topology.world_size
        assert all(len(layer.instances(e)) >= 1 for e in range(8))
    plan.save(tmp_path / "plan.json")
    assert GracePlan.load(tmp_path / "plan.json") == plan
    held = evaluate_plan(mixtral["humaneval"], plan, routing_policy="tar")
    if gpus * slots >= 8:  # a node's slots hold every expert: no token leaves its node
        for layer in plan.layers:
            for node in range(2):
                ranks = range(node * gpus, (node + 1) * gpus)
                assert sorted({e for r in ranks for e in layer.slots[r]}) == list(range(8))
        assert held["cross_node_copies_per_token"] == 0.0


def test_heavier_experts_get_more_copies_per_node():
    trace = synthetic(num_layers=1, num_experts=4, top_k=2, num_tokens=4000, skew=1.5, seed=1)
    topology = Topology(num_nodes=2, gpus_per_node=4)
    loads = np.bincount(trace.topk_ids[0].ravel(), minlength=4)
    layer = build_plan(trace, topology=topology, replication={"slots_per_gpu": 2}).layers[0]
    copies = [len(layer.instances(e)) for e in range(4)]
    assert copies[int(np.argmax(loads))] == max(copies) > min(copies) == copies[int(np.argmin(loads))]


def test_a_node_too_small_for_every_expert_takes_a_group_and_the_heaviest():
    loads = np.array([40.0, 30, 20, 10, 8, 6, 4, 2])
    affinity = np.eye(8)
    topology = Topology(num_nodes=4, gpus_per_node=1)
    layer = per_node_layer(loads, topology, slots_per_gpu=3, affinity_EE=affinity)
    assert all(len(s) == 3 for s in layer.slots)
    assert sorted({e for s in layer.slots for e in s}) == list(range(8))
    assert len(layer.instances(0)) >= 2 and len(layer.instances(7)) == 1  # room left: the heaviest
    with pytest.raises(PlanError, match=r"slots per GPU \(1\) must be in"):
        per_node_layer(loads, topology, slots_per_gpu=1)


def test_route_tables_keep_tokens_on_their_node(mixtral):
    topology = Topology(num_nodes=2, gpus_per_node=8)
    plan = build_plan(mixtral["gsm8k"], topology=topology, replication={"slots_per_gpu": 1})
    import torch

    ids = torch.tensor(mixtral["humaneval"].topk_ids[0][:64])  # a copy: the trace arrays are read-only
    for policy in ("tar", "wrr", "primary"):
        table = RouteTable.build(plan.layers[0], topology, policy)
        for origin in range(topology.world_size):
            ranks, _ = choose_instances(table, ids, origin_rank=origin)
            if policy == "tar":
                assert bool((ranks // 8 == origin // 8).all())
            assert bool((ranks >= 0).all())


def test_eplb_export_of_a_plan_with_more_gpus_than_experts(mixtral):
    topology = Topology(num_nodes=2, gpus_per_node=8)
    plan = build_plan(mixtral["gsm8k"], topology=topology, replication={"slots_per_gpu": 1})
    phy2log, log2phy, logcnt = plan.to_eplb()
    assert phy2log.shape == (32, 16) and (phy2log >= 0).all()
    assert (logcnt.sum(axis=1) == 16).all() and (logcnt >= 2).all()
    for layer in range(32):
        for e in range(8):
            assert (
                sorted(phy2log[layer, log2phy[layer, e, : logcnt[layer, e]]].tolist())
                == [e] * logcnt[layer, e]
            )
    eplb = build_plan(mixtral["gsm8k"], topology=topology, policy="eplb", replication={"slots_per_gpu": 1})
    assert all(len(s) == 1 for s in eplb.layers[0].slots)


@pytest.mark.parametrize("policy", ["contiguous", "occult"])
def test_single_instance_policies_refuse_more_gpus_than_experts(mixtral, policy):
    with pytest.raises(ValueError, match=r"num_experts \(8\) must be >= the world size \(16\)"):
        build_plan(mixtral["gsm8k"], topology=Topology(num_nodes=2, gpus_per_node=8), policy=policy)


def test_grace_without_budget_replication_refuses_more_gpus_than_experts(mixtral):
    with pytest.raises(PlanError, match=r"grace.replication must be enabled in mode 'budget'"):
        build_plan(
            mixtral["gsm8k"], topology=Topology(num_nodes=2, gpus_per_node=8), replication={"mode": "paper"}
        )
