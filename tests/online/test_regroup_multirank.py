"""Online re-grouping on 4 gloo ranks (2 nodes x 2): Mixtral routing shifts from gsm8k to humaneval (the
replay of test_online_multirank.py) and the re-planner may move primaries. Every forward's output is
checked against a single-process reference; every rank switches to the same plans at the same steps.
"""

from __future__ import annotations

import pytest

from ds_grace.comm.local_ranks import run_on_ranks
from ds_grace.online.replay import ReplaySpec, replay_many
from ds_grace.topology import Topology

pytestmark = pytest.mark.multirank

FP32_TOLERANCE = 1e-5
EXPERT_BYTES = 16_768
ONLINE = {"enabled": True, "interval": 2, "window": 3, "regroup": True, "sample_tokens": 48}
SPEC = ReplaySpec(steps=(8, 16), online=ONLINE)


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    by_rank = run_on_ranks(replay_many, topology=Topology(2, 2), args=((SPEC,),), timeout_s=600)
    return [by_rank[rank][0] for rank in range(4)]


def test_regrouping_moves_primaries_with_exact_outputs_on_every_rank(ranks):
    for rank in ranks:
        assert rank["error"] is None
        assert rank["max_abs_diff"] <= FP32_TOLERANCE, rank["max_abs_diff"]
    metrics = [rank["metrics"] for rank in ranks]
    assert len({m["plan_hash"] for m in metrics}) == 1
    decisions = {
        str([(m["switched_at_step"], m["layers"], m["plan_hash"]) for m in x["migrations"]]) for x in metrics
    }
    assert len(decisions) == len({str(rank["live_slots"]) for rank in ranks}) == 1
    migrations = metrics[0]["migrations"]
    assert any(m["primaries_moved"] > 0 for m in migrations)
    assert all(m["bytes_moved"] == EXPERT_BYTES * m["replicas_added"] for m in migrations)
    assert all(m["source"] == "peer" and m["bytes_from_peers"] == m["bytes_moved"] for m in migrations)
