"""Online re-grouping (pure): moves scored by gain per byte within the budget, primaries may move, and the
drift replay (`ds-grace replay-drift`) built on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ds_grace.cli import main as cli_main
from ds_grace.config import GraceConfig
from ds_grace.online.drift import DriftSpec, replay_drift
from ds_grace.online.regroup import (
    added_instances,
    full_nodes,
    keeps_full_nodes,
    layer_objective,
    node_parts,
    regroup,
    relabel_onto,
)
from ds_grace.planning.batch_balance import routed_weights
from ds_grace.planning.build import build_plan
from ds_grace.planning.plan import GracePlan, LayerPlan
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace, synthetic

TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2)
PROFILE = synthetic(
    num_layers=2, num_experts=16, top_k=2, num_tokens=3000, skew=0.8, co_activation=0.8, seed=1
)
SERVED = synthetic(
    num_layers=2, num_experts=16, top_k=2, num_tokens=3000, skew=0.8, co_activation=0.8, seed=7
)


def layer_cost(window, index, layer, topology, policy, *, batch_tokens=None) -> float:
    """copies / K + (1 - batch balancedness) of `layer` on the window: what a move's gain lowers."""
    objective = layer_objective(window, index, topology, policy, batch_tokens=batch_tokens)
    return objective.cost(routed_weights(layer, policy))


@pytest.fixture(scope="module")
def live():
    return build_plan(PROFILE, topology=TOPOLOGY)


def test_relabelling_a_renamed_layer_gives_the_live_layer_back(live):
    layer = live.layers[0]
    rename = [3, 2, 1, 0]  # nodes swapped, GPUs swapped inside them
    renamed = LayerPlan.from_lists(
        slots=[list(layer.slots[rename[r]]) for r in range(4)],
        slot_weights=[list(layer.slot_weights[rename[r]]) for r in range(4)],
        primary=[rename.index(r) for r in layer.primary],
    )
    back = relabel_onto(layer, renamed, TOPOLOGY)
    assert [set(s) for s in back.slots] == [set(s) for s in layer.slots]
    assert back.primary == layer.primary and added_instances(layer, back) == 0


def test_regroup_moves_primaries_toward_the_new_traffic(live):
    result = regroup(live, SERVED, config=GraceConfig(), expert_nbytes=10, max_bytes=None)
    assert result.plan is not None and result.moves
    assert any(move.kind == "regroup" for move in result.moves)
    assert any(result.plan.layers[i].primary != live.layers[i].primary for i in range(2))
    for move in result.moves:
        before = layer_cost(SERVED, move.layer, live.layers[move.layer], TOPOLOGY, "tar")
        after = layer_cost(SERVED, move.layer, result.plan.layers[move.layer], TOPOLOGY, "tar")
        assert after == pytest.approx(before - move.gain) and move.gain > 0
        assert move.nbytes == 10 * added_instances(live.layers[move.layer], result.plan.layers[move.layer])
        assert [len(s) for s in result.plan.layers[move.layer].slots] == [
            len(s) for s in live.layers[move.layer].slots
        ]
    assert result.bytes_moved == sum(move.nbytes for move in result.moves)
    again = regroup(live, SERVED, config=GraceConfig(), expert_nbytes=10, max_bytes=None)
    assert again.plan is not None and again.plan.content_hash == result.plan.content_hash


def test_moves_are_taken_by_gain_per_byte_within_the_budget(live):
    free = regroup(live, SERVED, config=GraceConfig(), expert_nbytes=10, max_bytes=None)
    per_byte = sorted((m.gain / m.nbytes for m in free.moves), reverse=True)
    smallest = min(m.nbytes for m in free.moves)
    capped = regroup(live, SERVED, config=GraceConfig(), expert_nbytes=10, max_bytes=smallest)
    assert 0 < capped.bytes_moved <= smallest and len(capped.moves) == 1
    assert capped.moves[0].gain / capped.moves[0].nbytes <= per_byte[0]
    assert regroup(live, SERVED, config=GraceConfig(), expert_nbytes=10, max_bytes=0).plan is None


def test_drift_replay_rows_and_what_regroup_buys():
    spec = DriftSpec(tokens_per_forward=250, window=2, online="regroup", expert_nbytes=5)
    rows = replay_drift(PROFILE, SERVED, topology=TOPOLOGY, spec=spec)
    assert [r["interval"] for r in rows] == list(range(12))
    assert set(rows[0]) == {
        "interval",
        "copies",
        "balancedness",
        "eplb_replanned_balancedness",
        "fitted_copies",
        "bytes_moved",
        "moves",
    }
    assert rows[0]["bytes_moved"] == 0 and any(r["bytes_moved"] > 0 for r in rows)
    off = replay_drift(
        PROFILE, SERVED, topology=TOPOLOGY, spec=DriftSpec(tokens_per_forward=250, online="off")
    )
    assert all(r["bytes_moved"] == 0 for r in off)
    late = slice(4, None)
    assert np.mean([r["copies"] for r in rows[late]]) < np.mean([r["copies"] for r in off[late]])


def test_cli_prints_the_intervals_as_json(tmp_path, capsys):
    PROFILE.save(tmp_path / "a.npz")
    SERVED.save(tmp_path / "b.npz")
    args = ["replay-drift", "--plan-on", str(tmp_path / "a.npz"), "--serve", str(tmp_path / "b.npz")]
    args += ["--nodes", "2", "--gpus-per-node", "2", "--tokens-per-forward", "1000", "--json"]
    assert cli_main([*args, "--max-bytes-per-interval", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])["intervals"]
    assert [r["interval"] for r in rows] == [0, 1, 2] and all(r["bytes_moved"] == 0 for r in rows)
    assert cli_main([*args, "--window", "0"]) == 2
    assert "window (0) must be an integer >= 1" in capsys.readouterr().err
    other = synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=100, seed=1)
    other.save(tmp_path / "c.npz")
    assert cli_main([*args[:4], str(tmp_path / "c.npz"), *args[5:]]) == 2
    assert "must have the same layers and experts" in capsys.readouterr().err


def test_a_move_may_not_empty_a_node_that_holds_every_expert():
    topology = Topology(num_nodes=2, gpus_per_node=4)  # S = 2: each node holds all 8 experts once
    live = LayerPlan.from_lists(slots=[[6, 2], [1, 0], [7, 3], [4, 5]] * 2, primary=[1, 1, 0, 2, 3, 3, 0, 2])
    assert full_nodes(live, topology).tolist() == [True, True]
    # a replica re-plan measured on Mixtral humaneval -> gsm8k (2x4): node 1 gives expert 6's copy to
    # expert 1, which its window needed more; the next tokens then crossed nodes for expert 6
    moved = LayerPlan.from_lists(
        slots=[[6, 2], [1, 0], [7, 3], [4, 5], [1, 2], [1, 0], [7, 3], [4, 5]],
        primary=[1, 1, 0, 2, 3, 3, 0, 2],
    )
    assert full_nodes(moved, topology).tolist() == [True, False]
    assert not keeps_full_nodes(live, moved, topology) and keeps_full_nodes(moved, live, topology)


def test_node_parts_step_toward_the_regrouped_layer_one_node_at_a_time():
    live = LayerPlan.from_lists(slots=[[0, 2], [1, 0], [2, 3], [3, 1]], primary=[0, 1, 2, 3])
    target = LayerPlan.from_lists(
        slots=[[0, 1], [1, 2], [2, 3], [3, 0]], primary=[0, 1, 2, 3], slot_weights=[[1.0, 2.0]] * 4
    )
    parts = node_parts(live, target, TOPOLOGY)
    assert [p.slots for p in parts] == [((0, 1), (1, 2), (2, 3), (3, 1)), ((0, 2), (1, 0), (2, 3), (3, 0))]
    assert (
        parts[0].slot_weights[:2] == target.slot_weights[:2]
        and parts[0].slot_weights[2:] == live.slot_weights[2:]
    )
    assert [added_instances(live, p) for p in parts] == [2, 1] and added_instances(live, target) == 3
    for part in parts:
        assert all(e in part.slots[part.primary[e]] for e in range(4))
    # a step that would leave an expert without an instance is not offered
    lonely = LayerPlan.from_lists(slots=[[0], [1], [2], [3]], primary=[0, 1, 2, 3])
    moved = LayerPlan.from_lists(slots=[[2], [3], [0], [1]], primary=[2, 3, 0, 1])
    assert node_parts(lonely, moved, TOPOLOGY) == []


def test_a_tight_budget_buys_one_swap_that_splits_experts_chosen_together():
    """Experts chosen in pairs (0, 1), (2, 3), ... each share a GPU: every forward-sized batch loads a GPU
    twice for each token of its pair. Two copies of budget buy one swap inside a node, which splits two
    pairs over that node's GPUs (no copy crosses nodes, so cross-node copies stay)."""
    live = GracePlan(
        topology=TOPOLOGY,
        layers=(
            LayerPlan.from_lists(slots=[[0, 1], [2, 3], [4, 5], [6, 7]], primary=[0, 0, 1, 1, 2, 2, 3, 3]),
        ),
    )
    pair_T = np.random.default_rng(0).integers(0, 4, size=600)
    window = RoutingTrace(topk_ids=(np.stack([2 * pair_T, 2 * pair_T + 1], axis=1),), num_experts=8)
    result = regroup(live, window, config=GraceConfig(), expert_nbytes=3, max_bytes=6, batch_tokens=16)
    assert result.plan is not None and result.bytes_moved == 6 and len(result.moves) == 1
    before, after = live.layers[0], result.plan.layers[0]
    moved = [
        (rank, set(a) ^ set(b))
        for rank, (a, b) in enumerate(zip(before.slots, after.slots))
        if set(a) != set(b)
    ]
    assert len(moved) == 2 and moved[0][0] // 2 == moved[1][0] // 2  # two GPUs of one node
    assert layer_cost(window, 0, after, TOPOLOGY, "tar", batch_tokens=16) == pytest.approx(
        layer_cost(window, 0, before, TOPOLOGY, "tar", batch_tokens=16) - result.moves[0].gain
    )
