"""Online replication without processes: re-planning, migration schedule, byte images, hash check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.counting import count_hot_path
from ds_grace.comm.migration import PlanMismatchError, hash_words, raise_on_hash_mismatch, words_hash
from ds_grace.config import parse_grace_block
from ds_grace.online import (
    module_bytes,
    module_from_bytes,
    next_chunks,
    plan_copies,
    predicted_balancedness,
    replan,
)
from ds_grace.online.replay import initial_plan, load_phases
from ds_grace.online.schedule import freed_replicas, source_rank
from ds_grace.planning.build import build_plan
from ds_grace.planning.plan import GracePlan, LayerPlan
from ds_grace.planning.replication import ReplicationError, replicate
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace

TOPO = Topology(2, 2)
PRIMARY = [0, 0, 1, 1, 2, 2, 3, 3]


def _plan(loads_LE: np.ndarray) -> GracePlan:
    return initial_plan(np.asarray(loads_LE, dtype=np.float64), TOPO, extra_slots_per_gpu=1)


def test_replan_recovers_shifted_mixtral_layers_and_is_deterministic():
    gsm8k, humaneval = load_phases()
    layers = [15, 25]
    before = np.stack([gsm8k.loads()[i] for i in layers])
    after = np.stack([humaneval.loads()[i] for i in layers])
    plan = _plan(before)
    first = replan(plan, after, threshold=0.85, policy="tar")
    second = replan(plan, after.copy(), threshold=0.85, policy="tar")
    assert first.plan is not None and first.layers == (0, 1)
    assert first.plan.content_hash == second.plan.content_hash
    assert all(b < 0.85 for b in first.balancedness_before)
    assert all(a >= 0.85 for a in first.balancedness_after)
    for index, layer in enumerate(first.plan.layers):
        assert layer.primary == plan.layers[index].primary  # grouping untouched
        assert predicted_balancedness(after[index], layer, TOPO, "tar") == first.balancedness_after[index]
    assert first.plan.meta["online_revision"] == 1


def test_replan_leaves_balanced_layers_alone():
    gsm8k, _ = load_phases()
    loads = np.stack([gsm8k.loads()[i] for i in (15, 25)])
    result = replan(_plan(loads), loads, threshold=0.85, policy="tar")
    assert result.plan is None and result.layers == ()
    with pytest.raises(ValueError, match=r"loads_LE \(shape \(3,\)\) must be \[layers=2, experts=8\]"):
        replan(_plan(loads), np.ones(3), threshold=0.85, policy="tar")
    with pytest.raises(ValueError, match=r"grace.replication.online.threshold \(1.5\) must be in \(0, 1\]"):
        replan(_plan(loads), loads, threshold=1.5, policy="tar")


def _layer(slots: list[list[int]]) -> LayerPlan:
    return LayerPlan.from_lists(slots=slots, primary=PRIMARY)


def test_copies_come_from_the_nearest_instance_and_dropped_replicas_are_listed():
    live = GracePlan(topology=TOPO, layers=(_layer([[0, 1], [2, 3, 6], [4, 5], [6, 7]]),))
    target = GracePlan(topology=TOPO, layers=(_layer([[0, 1, 6], [2, 3], [4, 5, 7], [6, 7, 0]]),))
    copies = plan_copies(live, target, expert_nbytes=[100])
    # expert 6 for rank 0: rank 1 (same node, replica) beats rank 3 (primary, other node)
    assert [(c.expert, c.src, c.dst) for c in copies] == [(6, 1, 0), (7, 3, 2), (0, 0, 3)]
    assert source_rank(live.layers[0], 7, 2, TOPO) == 3
    assert freed_replicas(live, target) == [(0, 6, 1)]


def test_chunks_respect_the_budget_and_cover_every_byte_once():
    live = GracePlan(topology=TOPO, layers=(_layer([[0, 1], [2, 3], [4, 5], [6, 7]]),))
    target = GracePlan(topology=TOPO, layers=(_layer([[0, 1, 6], [2, 3, 7], [4, 5, 0], [6, 7, 1]]),))
    copies = plan_copies(live, target, expert_nbytes=[1000])
    cursor, covered, rounds = 0, {c.key: np.zeros(1000, dtype=int) for c in copies}, 0
    while cursor < 4000:
        chunks, cursor = next_chunks(copies, cursor=cursor, budget=700)
        assert sum(c.nbytes for c in chunks) <= 700
        for c in chunks:
            covered[c.key][c.start : c.stop] += 1
        rounds += 1
    assert rounds == 6 and all((v == 1).all() for v in covered.values())
    everything, end = next_chunks(copies, cursor=0, budget=None)
    assert end == 4000 and [c.nbytes for c in everything] == [1000] * 4


def test_module_byte_image_round_trips_exactly():
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    image = module_bytes(expert)
    assert image.dtype == torch.uint8 and image.numel() == 4 * sum(p.numel() for p in expert.parameters())
    other = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    copy = module_from_bytes(other, image)
    x = torch.randn(5, 8)
    assert torch.equal(copy(x), expert(x))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(copy.parameters(), expert.parameters()))
    with pytest.raises(ValueError, match=r"replica image has 3 bytes; the expert's state needs"):
        module_from_bytes(other, image[:3])


def test_hash_mismatch_names_ranks_and_hashes():
    a, b = "ab" * 32, "cd" * 32
    assert words_hash(hash_words(a)) == a
    raise_on_hash_mismatch(torch.stack([hash_words(a)] * 4), what="step 4: re-plan")
    with pytest.raises(
        PlanMismatchError,
        match=r"step 4: re-plan: plan content_hash differs across EP ranks "
        r"\(EP rank 0: abababababababab, EP rank 1: cdcdcdcdcdcdcdcd\)",
    ):
        raise_on_hash_mismatch(torch.stack([hash_words(a), hash_words(b)]), what="step 4: re-plan")
    with pytest.raises(ValueError, match=r"hex_digest \('ab'\) must have 64 hex digits"):
        hash_words("ab")


def test_online_config_block():
    grace = parse_grace_block(
        {
            "replication": {
                "online": {"enabled": True, "interval": 8, "window": 2, "max_bytes_per_interval": 4096}
            }
        }
    )
    online = grace.replication.online
    assert (online.enabled, online.interval, online.window, online.max_bytes_per_interval) == (
        True,
        8,
        2,
        4096,
    )
    assert online.threshold == 0.85


def _single_rank_layer(num_experts: int = 4, hidden: int = 8):
    from ds_grace.moe.layer import GraceMoE

    torch.manual_seed(1)
    experts = [nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) for _ in range(num_experts)]
    plan = LayerPlan.from_lists(slots=[list(range(num_experts))], primary=[0] * num_experts)
    layer = GraceMoE.from_experts(experts, hidden_size=hidden, k=2, layer_plan=plan, topology=Topology(1, 1))
    return layer, experts


def test_swap_layer_plan_and_route_observer_on_one_rank():
    from ds_grace.online.replay import reference_output

    layer, experts = _single_rank_layer()
    x_TD = torch.randn(6, 8)
    ids_TK = torch.tensor([[0, 1], [2, 3], [3, -1], [1, 2], [0, 3], [2, 0]])
    w_TK = torch.rand(6, 2)
    seen = []
    layer.set_route_observer(seen.append)
    expected = reference_output(experts, x_TD, ids_TK, w_TK)
    assert torch.allclose(layer.forward_routed(x_TD, ids_TK, w_TK), expected, atol=1e-6)
    assert len(seen) == 1 and torch.equal(seen[0], ids_TK)
    modules = list(layer.deepspeed_moe.experts.deepspeed_experts)
    reordered = LayerPlan.from_lists(slots=[[3, 2, 1, 0]], primary=[0, 0, 0, 0])
    layer.swap_layer_plan(reordered, modules[::-1])
    assert layer.layer_plan == reordered and layer.num_local_experts == 4
    assert torch.allclose(layer.forward_routed(x_TD, ids_TK, w_TK), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"slot_modules has 3 modules but the plan gives EP rank 0 4 slots"):
        layer.swap_layer_plan(reordered, modules[:3])


def test_replicator_monitor_counts_and_metrics_on_one_rank():
    from ds_grace.config import OnlineReplicationConfig
    from ds_grace.online import OnlineReplicator

    layer, _ = _single_rank_layer()
    replicator = OnlineReplicator([layer], config=OnlineReplicationConfig(enabled=True, interval=2, window=2))
    x_TD = torch.randn(3, 8)
    batches = [torch.tensor([[0, 1], [0, 2], [3, -1]]), torch.tensor([[1, 0], [1, 2], [1, 3]])] * 3
    for ids_TK in batches:
        layer.forward_routed(x_TD, ids_TK, torch.ones(3, 2))
        replicator.step()
    assert replicator.window_loads().tolist() == [[6, 8, 4, 4]]  # last 2 intervals of 2 forwards
    with count_hot_path() as counts:  # the monitor keeps its counts on the device between boundaries
        layer.deepspeed_moe.route_observer(batches[0])
    assert counts.num_host_reads == 0, counts.host_reads
    metrics = replicator.metrics()
    assert [r["step"] for r in metrics["intervals"]] == [2, 4, 6]
    assert metrics["intervals"][0]["balancedness"] == [1.0] and metrics["migrations"] == []
    assert metrics["plan_hash"] == replicator.plan.content_hash and metrics["bytes_moved_total"] == 0
    replicator.close()
    layer.forward_routed(x_TD, batches[0], torch.ones(3, 2))
    assert replicator.window_loads().tolist() == [[6, 8, 4, 4]]
    with pytest.raises(ValueError, match=r"layers\[0\] \(Linear\) must be a GraceMoE"):
        OnlineReplicator([nn.Linear(2, 2)], config=OnlineReplicationConfig())


def test_replan_keeps_every_gpus_slot_count():
    gsm8k, humaneval = load_phases()
    layers = [15, 25]
    after = np.stack([humaneval.loads()[i] for i in layers])
    equal = build_plan(
        RoutingTrace(topk_ids=[gsm8k.topk_ids[i] for i in layers], num_experts=8),
        topology=TOPO,
        replication={"slots_per_gpu": 3},
    )
    assert {len(s) for layer in equal.layers for s in layer.slots} == {3}
    result = replan(equal, after, threshold=0.99, policy="tar")
    assert result.plan is not None and result.layers
    for index in result.layers:
        old, new = equal.layers[index], result.plan.layers[index]
        assert [len(s) for s in new.slots] == [3, 3, 3, 3]  # equal memory kept
        assert new.primary == old.primary and new.slots != old.slots
        assert result.balancedness_after[index] > result.balancedness_before[index]
    # a layer whose GPUs hold different slot counts keeps each count
    uneven = GracePlan(topology=TOPO, layers=(_layer([[0, 1, 6], [2, 3], [4, 5, 7, 0], [6, 7]]),))
    skewed = np.array([[40.0, 1, 1, 1, 30, 1, 1, 1]])
    moved = replan(uneven, skewed, threshold=0.99, policy="tar")
    assert moved.plan is not None
    assert [len(s) for s in moved.plan.layers[0].slots] == [3, 2, 4, 2]


def test_per_rank_slot_counts_are_checked():
    with pytest.raises(
        ReplicationError, match=r"slots_per_gpu\[1\] \(1\) must be in \[2 \(primaries on rank 1\)"
    ):
        replicate([5.0] * 8, PRIMARY, TOPO, slots_per_gpu=[3, 1, 3, 3])
    with pytest.raises(ReplicationError, match=r"lists 3 slot counts; the topology .* has 4 ranks"):
        replicate([5.0] * 8, PRIMARY, TOPO, slots_per_gpu=[3, 3, 3])
