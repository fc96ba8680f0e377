import json

import numpy as np
import pytest

from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError, route_table
from ds_grace.topology import Topology

TOPO = Topology(num_nodes=2, gpus_per_node=2)


def _layer() -> LayerPlan:
    # 6 experts on 4 ranks; expert 0 replicated on ranks 2 and 3, expert 5 on rank 1
    return LayerPlan.from_lists(
        slots=[[0, 1], [2, 5], [3, 0], [4, 5, 0]],
        primary=[0, 0, 1, 2, 3, 1],
        slot_weights=[[1.0, 1.0], [1.0, 3.0], [1.0, 2.0], [1.0, 1.0, 1.0]],
    )


def test_instances_primary_first():
    layer = _layer()
    assert layer.instances(0) == (0, 2, 3)
    assert layer.instance_weights(0) == (1.0, 2.0, 1.0)
    assert layer.instances(5) == (1, 3)
    assert layer.log2phy()[4] == [3]
    assert layer.replica_count() == 3


def test_route_table_tar_prefers_own_rank_then_node():
    cand, cdf = route_table(_layer(), TOPO, "tar")
    assert cand[0, 0].tolist() == [0, -1, -1]  # own rank hosts it
    assert cand[1, 0].tolist() == [0, -1, -1]  # node 0 has only rank 0's copy
    assert cand[2, 1].tolist() == [0, -1, -1]  # remote only
    assert cand[1, 3].tolist() == [2, -1, -1]
    # expert 5 from rank 2: rank 3 (same node) hosts a copy, so it is used
    assert cand[2, 5].tolist() == [3, -1, -1]
    # expert 2 from rank 0 -> rank 1 (same node)
    assert cand[0, 2].tolist() == [1, -1, -1]
    # expert 0 from rank 2 is hosted there; from rank 1 -> only node-0 copy is rank 0
    assert np.all(cdf[..., -1] == 1.0)


def test_route_table_wrr_uses_weights():
    cand, cdf = route_table(_layer(), TOPO, "wrr")
    assert cand[1, 0].tolist() == [0, 2, 3]
    assert np.allclose(cdf[1, 0], [0.25, 0.75, 1.0])
    primary_cand, _ = route_table(_layer(), TOPO, "primary")
    assert primary_cand[3, 0].tolist() == [0, -1, -1]


def test_route_table_rejects_unknown_policy():
    with pytest.raises(ValueError, match=r"grace.routing.policy \('nearest'\) must be one of"):
        route_table(_layer(), TOPO, "nearest")  # type: ignore[arg-type]


def test_plan_json_round_trip_and_hash(tmp_path):
    plan = GracePlan(topology=TOPO, layers=(_layer(), _layer()), trace_fingerprint="abc", meta={"r": 0.15})
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = GracePlan.load(path)
    assert loaded == plan
    assert loaded.content_hash == plan.content_hash
    data = json.loads(path.read_text())
    data["layers"][0]["slots"][0] = [1, 0]
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="content_hash"):
        GracePlan.load(path)


@pytest.mark.parametrize(
    ("slots", "primary", "message"),
    [
        ([[0, 0], [1], [2], [3]], [0, 1, 2, 3], r"slots\[0\] \(\[0, 0\]\) hosts an expert twice"),
        ([[0], [1], [2], []], [0, 1, 2, 3], r"experts \[3\] have no instance"),
        ([[0], [1], [2], [3]], [0, 1, 2, 0], r"primary\[3\] \(0\) must be a rank whose slots hold expert 3"),
        ([[0], [1], [2], [9]], [0, 1, 2, 3], r"expert id \(9\) must be in \[0, 4\)"),
    ],
)
def test_invalid_layers_are_errors(slots, primary, message):
    with pytest.raises(PlanError, match=message):
        GracePlan(topology=TOPO, layers=(LayerPlan.from_lists(slots=slots, primary=primary),))


def test_topology_mismatch_is_an_error():
    plan = GracePlan(topology=TOPO, layers=(_layer(),))
    with pytest.raises(
        PlanError,
        match=r"plan topology \(2 nodes x 2 GPUs\) does not match the cluster topology \(1 nodes x 4 GPUs\)",
    ):
        plan.check_compatible(topology=Topology(1, 4))
    with pytest.raises(PlanError, match="plan has 1 MoE layers but the model has 3"):
        plan.check_compatible(topology=TOPO, num_layers=3)
    with pytest.raises(
        PlanError, match=r"places experts on 4 ranks but the plan's topology \(1 nodes x 2 GPUs\) has 2"
    ):
        GracePlan(topology=Topology(1, 2), layers=(_layer(),))


def test_eplb_export_pads_with_minus_one():
    plan = GracePlan(topology=TOPO, layers=(_layer(),))
    phy2log, log2phy, logcnt = plan.to_eplb()
    assert phy2log.tolist() == [[0, 1, -1, 2, 5, -1, 3, 0, -1, 4, 5, 0]]
    assert logcnt.tolist() == [[3, 1, 1, 1, 1, 2]]
    assert log2phy[0, 0].tolist() == [0, 7, 11]
    assert log2phy[0, 1].tolist() == [1, -1, -1]
    for e in range(6):
        for p in log2phy[0, e, : logcnt[0, e]]:
            assert phy2log[0, p] == e


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        GracePlan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(PlanError, match=r"format_version \(99\) must be 1"):
        GracePlan.load(bad)
