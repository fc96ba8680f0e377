"""Online replication on 4 gloo ranks (2 nodes x 2): Mixtral routing shifts from gsm8k to humaneval.

One spawn serves four replays of two trace layers (15 and 25, whose offline plans, 3 slots on every
GPU, fall to a predicted balancedness of 0.67 and 0.71 on humaneval): online replication off; on (hierarchical
all-to-all); on with a byte budget per interval (flat all-to-all); on with rank 2 computing a
slightly different plan. Every forward's output is checked against a single-process reference.
"""

from __future__ import annotations

import pytest

from ds_grace.comm.local_ranks import run_on_ranks
from ds_grace.online.replay import ReplaySpec, replay_many
from ds_grace.topology import Topology

pytestmark = pytest.mark.multirank

SHIFT_STEP, STEPS_AFTER = 8, 24
INTERVAL = 2
THRESHOLD = 0.85
BUDGET = 40_000  # bytes per interval: about 2.4 replicas of 16,768 bytes
FP32_TOLERANCE = 1e-5
RECOVERY_INTERVALS = 6


def _online(**extra) -> dict:
    return {"enabled": True, "interval": INTERVAL, "window": 3, "threshold": THRESHOLD, **extra}


SPECS = (
    ReplaySpec(steps=(SHIFT_STEP, STEPS_AFTER), online=None, check_outputs=False),
    ReplaySpec(steps=(SHIFT_STEP, STEPS_AFTER), online=_online()),
    ReplaySpec(
        steps=(SHIFT_STEP, STEPS_AFTER), online=_online(max_bytes_per_interval=BUDGET), hierarchical=False
    ),
    ReplaySpec(steps=(SHIFT_STEP, STEPS_AFTER), online=_online(), mismatch_on_rank=2),
)


@pytest.fixture(scope="module")
def replays() -> list[list[dict]]:
    by_rank = run_on_ranks(replay_many, topology=Topology(2, 2), args=(SPECS,), timeout_s=240)
    return [[by_rank[rank][i] for rank in range(4)] for i in range(len(SPECS))]


def _recovery_step(live_balancedness: list[list[float]]) -> int | None:
    """First step after the shift from which every layer stays >= THRESHOLD to the end."""
    for step in range(SHIFT_STEP, len(live_balancedness)):
        if all(min(row) >= THRESHOLD for row in live_balancedness[step:]):
            return step
    return None


def test_off_stays_unbalanced_after_the_shift(replays):
    off = replays[0][0]["live_balancedness"]
    assert all(min(row) >= THRESHOLD for row in off[:SHIFT_STEP])
    assert all(max(row) < 0.75 for row in off[SHIFT_STEP:])  # well below THRESHOLD: re-planning must act


def test_online_recovers_with_exact_outputs(replays):
    ranks = replays[1]
    for rank in ranks:
        assert rank["error"] is None
        assert rank["max_abs_diff"] <= FP32_TOLERANCE, rank["max_abs_diff"]
    metrics = [rank["metrics"] for rank in ranks]
    # every rank switched to the same plans at the same steps
    assert len({m["plan_hash"] for m in metrics}) == 1
    assert len({tuple(mig["switched_at_step"] for mig in m["migrations"]) for m in metrics}) == 1
    assert len({str(rank["live_slots"]) for rank in ranks}) == 1
    recovered = _recovery_step(ranks[0]["live_balancedness"])
    assert recovered is not None and recovered - SHIFT_STEP <= RECOVERY_INTERVALS * INTERVAL, recovered
    migrations = metrics[0]["migrations"]
    assert migrations and all(m["bytes_moved"] > 0 and m["transfer_s"] > 0 for m in migrations)
    assert all(m["bytes_moved"] == 16_768 * m["replicas_added"] for m in migrations)
    assert all(m["source"] == "peer" and m["bytes_from_peers"] == m["bytes_moved"] for m in migrations)
    assert all(m["bytes_read_from_disk"] == m["rank_bytes_read_from_disk"] == 0 for m in migrations)
    assert all(m["switched_at_step"] > SHIFT_STEP for m in migrations)  # nothing moved while balanced
    assert metrics[0]["bytes_moved_total"] == sum(m["bytes_moved"] for m in migrations)
    intervals = metrics[0]["intervals"]
    assert [r["step"] for r in intervals] == list(range(INTERVAL, SHIFT_STEP + STEPS_AFTER + 1, INTERVAL))
    assert min(min(r["balancedness"]) for r in intervals[SHIFT_STEP // INTERVAL :][:2]) < THRESHOLD


def test_byte_budget_caps_every_interval(replays):
    ranks = replays[2]
    for rank in ranks:
        assert rank["error"] is None and rank["max_abs_diff"] <= FP32_TOLERANCE, rank["max_abs_diff"]
    metrics = ranks[0]["metrics"]
    per_interval = [r["bytes_moved"] for r in metrics["intervals"]]
    assert max(per_interval) <= BUDGET and sum(per_interval) > BUDGET
    # a migration larger than the budget spreads over several intervals, outputs exact throughout
    assert any(m["transfer_intervals"] >= 2 for m in metrics["migrations"])
    for m in metrics["migrations"]:
        assert m["transfer_intervals"] == -(-m["bytes_moved"] // BUDGET)
    assert _recovery_step(ranks[0]["live_balancedness"]) is not None


def test_plan_hash_mismatch_is_an_error_on_every_rank(replays):
    ranks = replays[3]
    for rank in ranks:
        assert rank["error"] is not None, rank["rank"]
        assert "plan content_hash differs across EP ranks" in rank["error"]
        assert "nothing was switched" in rank["error"]
        assert rank["metrics"]["migrations"] == [] and not rank["metrics"]["migrating"]
        assert rank["max_abs_diff"] <= FP32_TOLERANCE
    assert len({rank["error"] for rank in ranks}) == 1
    # the offline plan is still live: the same slots as the run without online replication
    assert ranks[0]["live_slots"] == replays[0][0]["live_slots"]
