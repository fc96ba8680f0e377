"""ds_grace.routing: TAR / WRR / primary instance choice as tensor ops (no processes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_grace.planning.plan import LayerPlan
from ds_grace.routing import (
    RouteTable,
    choose_codes,
    choose_instances,
    id_range_error,
    sampled_instances,
    screen_topk_ids,
)
from ds_grace.topology import Topology

TOPO_2X2 = Topology(num_nodes=2, gpus_per_node=2)


def _plan() -> LayerPlan:
    # expert 0: rank 0 (primary) + rank 3 (replica, weight 3); expert 1: rank 1 + rank 2 (weights 1, 1);
    # expert 2: rank 2 only; expert 3: rank 3 + rank 0 + rank 1 (weights 1, 2, 1).
    return LayerPlan.from_lists(
        slots=[[0, 3], [1, 3], [2, 1], [3, 0]],
        primary=[0, 1, 2, 3],
        slot_weights=[[1.0, 2.0], [1.0, 1.0], [1.0, 1.0], [1.0, 3.0]],
    )


def _all_tokens_choose(expert: int, n: int, k: int = 1) -> torch.Tensor:
    return torch.full((n, k), expert, dtype=torch.long)


def test_tar_prefers_own_rank_then_own_node_then_remote_by_weight():
    table = RouteTable.build(_plan(), TOPO_2X2, "tar")
    # own rank hosts expert 0 -> always rank 0, slot 0
    rank, slot = choose_instances(table, _all_tokens_choose(0, 50), origin_rank=0)
    assert rank.unique().tolist() == [0] and slot.unique().tolist() == [0]
    # rank 1 does not host expert 0; its node (ranks 0, 1) does: rank 0 only
    rank, _ = choose_instances(table, _all_tokens_choose(0, 50), origin_rank=1)
    assert rank.unique().tolist() == [0]
    # rank 0 -> expert 2: only on rank 2 (other node)
    rank, slot = choose_instances(table, _all_tokens_choose(2, 20), origin_rank=0)
    assert rank.unique().tolist() == [2] and slot.unique().tolist() == [0]
    # rank 3 -> expert 1: rank 2 is on its node -> always rank 2 (slot 1 there)
    rank, slot = choose_instances(table, _all_tokens_choose(1, 20), origin_rank=3)
    assert rank.unique().tolist() == [2] and slot.unique().tolist() == [1]


def test_wrr_shares_follow_weights_with_low_discrepancy():
    table = RouteTable.build(_plan(), TOPO_2X2, "wrr")
    n = 1000
    for origin in range(4):
        rank, _ = choose_instances(table, _all_tokens_choose(3, n), origin_rank=origin)
        counts = torch.bincount(rank.reshape(-1), minlength=4).tolist()
        # expert 3: instances rank 3 (w 1), rank 0 (w 2), rank 1 (w 1) -> shares 1/4, 1/2, 1/4
        expected = [n / 2, n / 4, 0, n / 4]
        assert counts[2] == 0
        assert max(abs(c - e) for c, e in zip(counts, expected)) <= 3, (origin, counts)


def test_primary_policy_never_uses_replicas():
    table = RouteTable.build(_plan(), TOPO_2X2, "primary")
    ids = torch.tensor([[0, 1], [3, 2], [1, 3]] * 20)
    for origin in range(4):
        rank, slot = choose_instances(table, ids, origin_rank=origin)
        assert torch.equal(rank, torch.tensor([[0, 1], [3, 2], [1, 3]] * 20))
        assert torch.equal(slot, torch.tensor([[0, 0], [0, 0], [0, 0]] * 20))


def test_choice_is_deterministic_and_points_at_a_hosting_slot():
    plan = _plan()
    table = RouteTable.build(plan, TOPO_2X2, "tar")
    generator = torch.Generator().manual_seed(3)
    ids = torch.rand(200, 4, generator=generator).argsort(dim=1)[:, :2]
    first = choose_instances(table, ids, origin_rank=1)
    again = choose_instances(RouteTable.build(plan, TOPO_2X2, "tar"), ids.clone(), origin_rank=1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for (r, s), e in zip(
        zip(first[0].reshape(-1).tolist(), first[1].reshape(-1).tolist()), ids.reshape(-1).tolist()
    ):
        assert plan.slots[r][s] == e


def test_masked_routes_stay_masked_and_empty_batches_work():
    table = RouteTable.build(_plan(), TOPO_2X2, "tar")
    rank, slot = choose_instances(table, torch.tensor([[0, -1], [-1, -1]]), origin_rank=2)
    assert rank[:, 1].tolist() == [-1, -1] and slot[1].tolist() == [-1, -1]
    assert rank[0, 0].item() in (0, 3)
    rank, slot = choose_instances(table, torch.zeros(0, 3, dtype=torch.long), origin_rank=0)
    assert rank.shape == (0, 3) and slot.shape == (0, 3)


def test_route_offset_moves_along_the_sequence():
    table = RouteTable.build(_plan(), TOPO_2X2, "wrr")
    ids = _all_tokens_choose(1, 8)
    full, _ = choose_instances(table, _all_tokens_choose(1, 16), origin_rank=0)
    shifted, _ = choose_instances(table, ids, origin_rank=0, route_offset=8)
    assert torch.equal(shifted, full[8:])


def test_screen_topk_ids_clamps_reports_the_range_and_checks_the_form():
    ids_TK, range_2 = screen_topk_ids(torch.tensor([[0, 4], [-2, 1]]), 4)
    assert ids_TK.tolist() == [[0, 3], [-1, 1]] and range_2.tolist() == [-2, 4]
    ids_TK, range_2 = screen_topk_ids(torch.zeros(0, 2, dtype=torch.long), 4)
    assert ids_TK.shape == (0, 2) and range_2.tolist() == [-1, -1]  # no tokens: a valid range
    with pytest.raises(ValueError, match=r"topk_ids \(dtype torch.float32\) must be an integer tensor"):
        screen_topk_ids(torch.zeros(2, 1), 4)
    with pytest.raises(ValueError, match=r"topk_ids \(shape \(3,\)\) must be 2-D"):
        screen_topk_ids(torch.zeros(3, dtype=torch.long), 4)


def test_id_range_error_names_the_first_bad_rank_and_its_id():
    assert id_range_error(np.array([[-1, 3], [0, 0]]), 4) is None
    error = id_range_error(np.array([[0, 3], [0, 4], [-2, 1]]), 4)
    assert str(error) == "topk_ids holds expert id 4 on EP rank 1; ids must be in [0, 4) or -1 (no route)"
    assert "expert id -2 on EP rank 0;" in str(id_range_error(np.array([[-2, 9]]), 4))


def test_route_table_rejects_a_plan_for_another_topology():
    with pytest.raises(
        ValueError, match=r"layer_plan places experts on 4 ranks but the topology \(1 nodes x 2 GPUs\) has 2"
    ):
        RouteTable.build(_plan(), Topology(1, 2), "tar")


def test_expert2slot_matches_plan():
    table = RouteTable.build(_plan(), TOPO_2X2, "tar")
    expected = np.full((4, 4), -1)
    for r, experts in enumerate(_plan().slots):
        for s, e in enumerate(experts):
            expected[r, e] = s
    assert table.expert2slot_RE.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("slots", "primary", "topology", "policy", "single"),
    [
        ([[0, 1, 2, 3]], [0, 0, 0, 0], Topology(1, 1), "tar", [True]),  # a world of one
        ([[0, 1], [2, 3], [0, 1], [2, 3]], [0, 0, 1, 1], Topology(2, 2), "primary", [True] * 4),
        # TAR: node 0 holds every expert, its own copy or its node's one; node 1 lacks expert 0, which
        # has two copies on node 0: its ranks draw between them
        (
            [[0, 1, 2], [0, 3, 1], [1, 2, 3], [1, 2, 3]],
            [0, 0, 0, 1],
            Topology(2, 2),
            "tar",
            [True, True, False, False],
        ),
        ([[0, 1, 2], [0, 3, 1], [1, 2, 3], [1, 2, 3]], [0, 0, 0, 1], Topology(2, 2), "wrr", [False] * 4),
    ],
)
def test_single_candidate_lookup_picks_what_the_sequence_picks(slots, primary, topology, policy, single):
    plan = LayerPlan.from_lists(slots=slots, primary=primary)
    table = RouteTable.build(plan, topology, policy)
    assert list(table.single_candidate_R) == single
    ids_TK = torch.randint(-1, plan.num_experts, (37, 2), generator=torch.Generator().manual_seed(3))
    for origin in range(topology.world_size):
        got = choose_instances(table, ids_TK, origin_rank=origin, route_offset=5)
        expected = sampled_instances(table, ids_TK, origin_rank=origin, route_offset=5)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), origin
        assert ((got[0] == -1) == (ids_TK == -1)).all()
        # the codes the runtime dispatches name the same instances: 1 + rank * stride + slot, 0: no route
        code_TK = choose_codes(table, ids_TK, origin_rank=origin, route_offset=5)
        stride = max(len(s) for s in slots)
        assert code_TK.dtype == torch.int32 and table.slot_stride == stride
        assert torch.equal(code_TK.long(), torch.where(ids_TK >= 0, 1 + got[0] * stride + got[1], 0)), origin
