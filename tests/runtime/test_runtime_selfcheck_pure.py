"""The selfcheck's own pieces, without processes: traffic expectation, case generation, CLI errors."""

from __future__ import annotations

import torch

from ds_grace.cli import main
from ds_grace.comm.all_to_all import dispatch_row_bytes
from ds_grace.commands.selfcheck import SCENARIOS, expected_traffic, make_case, traffic_equal
from ds_grace.topology import Topology

TOPO = Topology(2, 2)
# origin rank 0 holds 4 tokens; the others none. Routes name the hosting ranks (k = 2):
# t0 -> ranks 1 and 3, t1 -> 2 and 3, t2 -> 0 only, t3 -> rank 3 twice (two experts on rank 3).
RANKS = [torch.tensor([[1, 3], [2, 3], [0, -1], [3, 3]]), *[torch.zeros(0, 2, dtype=torch.long)] * 3]
SLOTS = [torch.tensor([[0, 1], [0, 0], [1, -1], [0, 1]]), *[torch.zeros(0, 2, dtype=torch.long)] * 3]
HIDDEN = 4
ROW = dispatch_row_bytes(2, HIDDEN, torch.float32)  # 8 * k + 4 * hidden = 32
BACK = HIDDEN * 4
# one header row per peer: flat rows, relay rows, rows via the relay per GPU (2), routes per slot (2),
# the sender's expert id range (2)
HEADER = 8 * (2 + 2 + 2 + 2)
FLAT_HEADER = 8 * (1 + 2 + 2)  # flat rows, routes per slot, id range


def _expect(ep_index: int, *, hierarchical: bool, dedup: bool = True) -> dict:
    return expected_traffic(
        RANKS,
        SLOTS,
        topology=TOPO,
        ep_index=ep_index,
        hierarchical=hierarchical,
        dedup=dedup,
        hidden=HIDDEN,
        dtype=torch.float32,
        num_local_slots=2,
        slot_stride=2,
    )


def _t(**fields: int) -> dict[str, int]:
    base = {
        f"{kind}_{d}_{s}": 0
        for kind in ("rows", "bytes")
        for d in ("sent", "recv")
        for s in ("intra", "inter")
    }
    return {**base, **fields}


def _sizes(per_row: int) -> dict[str, int]:
    return _t(
        rows_sent_intra=1,
        rows_sent_inter=2,
        rows_recv_intra=1,
        rows_recv_inter=2,
        bytes_sent_intra=per_row,
        bytes_sent_inter=2 * per_row,
        bytes_recv_intra=per_row,
        bytes_recv_inter=2 * per_row,
    )


def test_row_bytes_are_8_aligned():
    assert ROW == 32
    assert dispatch_row_bytes(2, 17, torch.bfloat16) == 56  # 16 + 34 -> 56


def test_hierarchical_expectation_by_hand():
    # rank 0: t0, t1, t3 cross to node 1 once each via peer rank 2; t0 also goes to rank 1 in-node.
    assert _expect(0, hierarchical=True)["stages"] == {
        "sizes": _sizes(HEADER),
        "dispatch.stage1": _t(rows_sent_inter=3, bytes_sent_inter=3 * ROW),
        "combine.stage1": _t(rows_recv_inter=3, bytes_recv_inter=3 * BACK),
        "dispatch.stage2": _t(rows_sent_intra=1, bytes_sent_intra=ROW),
        "combine.stage2": _t(rows_recv_intra=1, bytes_recv_intra=BACK),
    }
    # rank 2 relays: receives 3 rows, forwards t0, t1, t3 to rank 3 (t1's rank-2 route stays here)
    relay = _expect(2, hierarchical=True)
    assert relay["stages"]["dispatch.stage1"] == _t(rows_recv_inter=3, bytes_recv_inter=3 * ROW)
    assert relay["stages"]["dispatch.stage2"] == _t(rows_sent_intra=3, bytes_sent_intra=3 * ROW)
    assert relay["expert_rows"] == [1, 0]
    assert _expect(3, hierarchical=True)["expert_rows"] == [2, 2]
    assert _expect(0, hierarchical=True)["expert_rows"] == [0, 1]


def test_flat_expectation_by_hand_with_and_without_dedup():
    dedup = _expect(0, hierarchical=False)["stages"]
    assert dedup["dispatch"] == _t(
        rows_sent_intra=1, rows_sent_inter=4, bytes_sent_intra=ROW, bytes_sent_inter=4 * ROW
    )
    assert dedup["combine"] == _t(
        rows_recv_intra=1, rows_recv_inter=4, bytes_recv_intra=BACK, bytes_recv_inter=4 * BACK
    )
    assert dedup["sizes"] == _sizes(FLAT_HEADER)
    no_dedup = _expect(0, hierarchical=False, dedup=False)["stages"]
    assert no_dedup["dispatch"]["rows_sent_inter"] == 5
    assert _expect(3, hierarchical=False, dedup=False)["stages"]["dispatch"]["rows_recv_inter"] == 4


def test_traffic_equal_detects_any_difference():
    expected = _expect(0, hierarchical=True)
    snapshot = {"stages": {**expected["stages"], "idle": _t()}, "expert_rows": [0, 1]}
    assert traffic_equal(snapshot, expected)
    off_by_one = {name: dict(t) for name, t in expected["stages"].items()}
    off_by_one["dispatch.stage2"]["bytes_sent_intra"] += 1
    assert not traffic_equal({"stages": off_by_one, "expert_rows": [0, 1]}, expected)
    assert not traffic_equal({"stages": expected["stages"], "expert_rows": [1, 1]}, expected)


def test_cases_are_reproducible_and_cover_every_scenario():
    cases = [make_case(0, i, TOPO, ("fp32", "bf16")) for i in range(8)]
    assert cases == [make_case(0, i, TOPO, ("fp32", "bf16")) for i in range(8)]
    assert {c.scenario for c in cases} == set(SCENARIOS) and {c.dtype for c in cases} == {"fp32", "bf16"}
    for case in cases:
        case.plan.validate()
        assert case.plan.replica_count() >= 1 and case.k <= case.num_experts
        if case.scenario == "zero_token_rank":
            assert 0 in case.tokens_per_rank


def test_cli_rejects_bad_arguments(capsys):
    assert main(["selfcheck", "--world-size", "6", "--nodes", "4"]) == 2
    assert "--world-size (6) must be a positive multiple of --nodes (4)" in capsys.readouterr().err
    assert main(["selfcheck", "--cases", "0"]) == 2
    assert "--cases (0) must be >= 1" in capsys.readouterr().err
