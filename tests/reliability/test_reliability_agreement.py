"""What ranks must agree on: the start-up fingerprint (pure), the handshake's messages, the online
replicator's per-boundary decision check, and plans that are strictly typed and fully hashed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ds_grace.comm.collectives import check_ranks_agree
from ds_grace.comm.migration import NO_PLAN_HASH, PlanMismatchError, hash_words, raise_on_hash_mismatch
from ds_grace.config import parse_grace_block
from ds_grace.fingerprint import (
    LOCAL_FIELDS,
    RankMismatchError,
    disagreements,
    rank_identity,
    run_fingerprint,
)
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError
from ds_grace.preflight import preflight
from ds_grace.topology import Topology


def _plan(*, num_experts: int = 8, num_layers: int = 2) -> GracePlan:
    topology = Topology(2, 2)
    per_rank = num_experts // topology.world_size
    layer = LayerPlan.from_lists(
        slots=[list(range(r * per_rank, (r + 1) * per_rank)) for r in range(topology.world_size)],
        primary=[e // per_rank for e in range(num_experts)],
    )
    return GracePlan(topology=topology, layers=(layer,) * num_layers, meta={"routing_policy": "tar"})


def _checked(tmp_path, *, rank: int = 0, name: str = "plan.json", **grace):
    _plan().save(tmp_path / name)
    block = {
        "plan": {"path": str(tmp_path / name)},
        "topology": {"num_nodes": 2, "gpus_per_node": 2},
        **grace,
    }
    return preflight({"dtype": "fp32"}, parse_grace_block(block), world_size=4, rank=rank, env={})


# ---- the fingerprint ----


def test_fingerprint_names_every_setting_that_must_agree(tmp_path):
    fields = run_fingerprint(_checked(tmp_path))
    for name in (
        "grace.communication.path",
        "grace.communication.dedup",
        "grace.routing.policy",
        "grace.replication.online.interval",
        "grace.replication.online.threshold",
        "grace.grouping.max_experts_per_gpu",
        "plan.content_hash",
        "topology",
        "world_size",
        "dtype",
        "ds_config.moe.ep_size",
        "versions.ds_grace",
        "versions.deepspeed",
        "versions.torch",
    ):
        assert name in fields, name
    assert (
        fields["topology"] == "2x2"
        and fields["dtype"] == "float32"
        and fields["ds_config.moe.ep_size"] == "4"
    )
    assert not LOCAL_FIELDS & fields.keys() and not any(k.startswith("grace.vanilla.") for k in fields)


def test_ranks_may_differ_in_paths_and_timeouts_only(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = run_fingerprint(_checked(tmp_path / "a"))
    b = run_fingerprint(_checked(tmp_path / "b", communication={"timeout_s": 30}))
    assert a == b  # another path to the same plan, another timeout
    c = run_fingerprint(_checked(tmp_path / "a", communication={"path": "flat", "dedup": True}))
    assert {k for k in a if a[k] != c.get(k)} == {"grace.communication.path"}
    d = run_fingerprint(_checked(tmp_path / "a", replication={"online": {"enabled": True, "interval": 8}}))
    e = run_fingerprint(_checked(tmp_path / "b", replication={"online": {"enabled": True, "interval": 64}}))
    identities = [{"rank": r, "node": r // 2, "host": "h"} for r in range(4)]
    assert disagreements([d, d, e, e], identities) == [
        "grace.replication.online.interval differs: 8 on ranks 0-1; 64 on ranks 2-3"
    ]


def test_disagreements_name_the_field_and_every_ranks_value():
    base = {"grace.communication.hierarchical": True, "plan.content_hash": "ab"}
    fingerprints = [base, base, {**base, "grace.communication.hierarchical": False}, base]
    identities = [{"rank": r, "node": r // 2, "host": f"h{r // 2}"} for r in range(4)]
    assert disagreements([base] * 4, identities) == []
    assert disagreements(fingerprints, identities) == [
        "grace.communication.hierarchical differs: true on ranks 0-1, 3; false on rank 2"
    ]
    del fingerprints[1]["plan.content_hash"]  # the same dict object as ranks 0 and 3: all but rank 2
    assert (
        disagreements(fingerprints, identities)[1]
        == "plan.content_hash differs: (unset) on ranks 0-1, 3; ab on rank 2"
    )


def test_disagreements_catch_a_topology_that_does_not_match_the_hosts():
    same = [{"world_size": 4}] * 4
    # the config says 2 nodes x 2, the launcher put ranks 0, 2 on host a and 1, 3 on host b
    identities = [{"rank": r, "node": r // 2, "host": "ab"[r % 2]} for r in range(4)]
    problems = disagreements(same, identities)
    assert problems[0].startswith("node 0 of the topology spans several hosts (a has rank 0; b has rank 1)")
    assert "grace.topology does not match how the launcher placed the ranks" in problems[0]
    swapped = [{"rank": 1, "node": 0, "host": "a"}, {"rank": 0, "node": 0, "host": "a"}]
    assert disagreements(same[:2], swapped) == [
        "rank 0 reports rank number 1",
        "rank 1 reports rank number 0",
    ]


def test_handshake_without_a_process_group_checks_this_rank_alone(tmp_path):
    checked = _checked(tmp_path, rank=0)
    identities = check_ranks_agree(run_fingerprint(checked), rank_identity(checked))
    assert identities == [rank_identity(checked)] and identities[0]["node"] == 0
    error = RankMismatchError("x")
    assert isinstance(error, ValueError)


# ---- the online replicator's decisions ----


def test_every_boundary_compares_every_ranks_decision_also_no_replan(monkeypatch):
    import ds_grace.online.replicator as replicator_module
    from ds_grace.config import OnlineReplicationConfig
    from ds_grace.moe.layer import GraceMoE
    from ds_grace.online import OnlineReplicator

    torch.manual_seed(1)
    experts = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)]
    plan = LayerPlan.from_lists(slots=[list(range(4))], primary=[0] * 4)
    layer = GraceMoE.from_experts(experts, hidden_size=8, k=2, layer_plan=plan, topology=Topology(1, 1))
    replicator = OnlineReplicator([layer], config=OnlineReplicationConfig(enabled=True, interval=1, window=1))
    decisions = []
    monkeypatch.setattr(
        replicator_module,
        "check_same_hash",
        lambda digest, **kwargs: decisions.append((digest, kwargs["what"])),
    )
    layer.forward_routed(torch.randn(3, 8), torch.tensor([[0, 1], [1, 2], [2, 3]]), torch.ones(3, 2))
    replicator.step()
    replicator.step()
    assert decisions == [(NO_PLAN_HASH, "step 1: re-plan"), (NO_PLAN_HASH, "step 2: re-plan")]
    replicator.close()


def test_a_rank_deciding_alone_is_named():
    with pytest.raises(
        PlanMismatchError,
        match=r"step 8: re-plan: plan content_hash differs across EP ranks \(EP rank 0: none, EP rank 1: abab",
    ):
        raise_on_hash_mismatch(
            torch.stack([hash_words(NO_PLAN_HASH), hash_words("ab" * 32)]), what="step 8: re-plan"
        )


# ---- plans: every layer, strict types, a required hash over every field ----


def _saved(tmp_path, data: dict) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_layer_with_another_expert_count_names_layer_and_file(tmp_path):
    eight, seven = _plan(num_experts=8).layers[0], _plan(num_experts=4).layers[0]
    with pytest.raises(PlanError, match=r"plan.layers\[1\] has 4 experts but plan.layers\[0\] has 8"):
        GracePlan(topology=Topology(2, 2), layers=(eight, seven))
    data = _plan().to_dict()
    layer1 = data["layers"][1]
    layer1["primary"] = layer1["primary"][:7]
    layer1["slots"][3] = [6]
    layer1["slot_weights"][3] = [1.0]
    path = _saved(tmp_path, data)
    with pytest.raises(PlanError) as info:
        GracePlan.load(path)
    assert str(info.value) == (
        f"plan file ({path}): plan.layers[1] has 7 experts but plan.layers[0] has 8; every MoE layer of a plan "
        "has the same expert count"
    )


@pytest.mark.parametrize(
    ("value", "shown"), [("1", "'1'"), (2.9, "2.9"), (1.0, "1.0"), (True, "True"), (None, "None")]
)
def test_slot_ids_are_never_coerced(tmp_path, value, shown):
    data = _plan().to_dict()
    data["layers"][0]["slots"][0][1] = value  # the stored hash is the one of the integer id 1
    with pytest.raises(PlanError, match=rf"plan.layers\[0\].slots\[0\]\[1\] \({shown}\) must be an integer"):
        GracePlan.load(_saved(tmp_path, data))


def test_the_hash_is_required_and_covers_meta(tmp_path):
    data = _plan().to_dict()
    assert GracePlan.load(_saved(tmp_path, data)).meta == {"routing_policy": "tar"}
    changed = {**data, "meta": {"routing_policy": "wrr"}}
    with pytest.raises(PlanError, match=r"plan.content_hash \('[0-9a-f]{64}'\) does not match its content"):
        GracePlan.load(_saved(tmp_path, changed))
    unhashed = {k: v for k, v in data.items() if k != "content_hash"}
    with pytest.raises(PlanError, match=r"plan lacks the field\(s\) \['content_hash'\]"):
        GracePlan.load(_saved(tmp_path, unhashed))
    with pytest.raises(PlanError, match=r"plan has unknown field\(s\) \['extra'\]"):
        GracePlan.load(_saved(tmp_path, {**data, "extra": 1}))
    with pytest.raises(PlanError, match=r"plan.layers\[0\].slot_weights\[0\]\[0\] \('1'\) must be a number"):
        bad = json.loads(json.dumps(data))
        bad["layers"][0]["slot_weights"][0][0] = "1"
        GracePlan.load(_saved(tmp_path, bad))
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(data).replace('"slot_weights": [[1.0', '"slot_weights": [[NaN', 1))
    with pytest.raises(PlanError, match=r"is not valid JSON: NaN is not a JSON number"):
        GracePlan.load(path)


def test_a_plan_fitted_for_another_routing_policy_is_refused_before_any_collective(tmp_path):
    assert _checked(tmp_path, routing={"policy": "tar"}).plan is not None
    with pytest.raises(
        PlanError,
        match=r"fitted for routing policy 'tar' \(plan meta\.routing_policy\) but grace\.routing\.policy is 'wrr'",
    ):
        _checked(tmp_path, routing={"policy": "wrr"})
