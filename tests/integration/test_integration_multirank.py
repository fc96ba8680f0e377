"""ds_grace.init_inference on 4 gloo ranks laid out as 2 nodes x 2, for every supported family.

One spawn serves every case (spawning costs more than serving tiny models). Per transformers family:
GRACE (plan profiled and built by ds_grace, replicas included) and vanilla DeepSpeed-MoE (lossless), each
rank generating for its two of the eight prompts; the gathered continuations must equal single-process
transformers ``generate`` token for token, and the prefill logits must match within
atol=1e-5, rtol=1e-4 (fp32; the distributed layers add expert outputs in another order).
The DeepSpeed-MoE toy model is served both ways too (outputs within the same tolerance of the
single-process model), vanilla with a small capacity shows dropped routes, and profiling on the served
engines is gathered to rank 0 and equals single-process profiling.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from integration_cases import (
    HFCase,
    ToyCase,
    calibration_batches,
    hf_reference,
    plan_for,
    prompt_batch,
    serve_cases_on_rank,
)

from ds_grace.comm.local_ranks import run_on_ranks
from ds_grace.config import parse_grace_block
from ds_grace.models import load_checkpoint, tiny_checkpoint
from ds_grace.models.adapters import HF_FAMILIES
from ds_grace.models.toy import ToyMoEConfig, ToyMoEModel, toy_batch
from ds_grace.planning.build import build_plan
from ds_grace.planning.plan import GracePlan
from ds_grace.profiling import profile_routing
from ds_grace.topology import Topology
from ds_grace.trace import synthetic
from ds_grace.vanilla import LOSSLESS, configure_vanilla_gates, reference_forward

pytestmark = pytest.mark.multirank

TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2)
ATOL, RTOL = 1e-5, 1e-4
# Runtime variants spread over the families, so that each mode is served end to end at least once.
RUNTIME_VARIANTS = {
    "qwen2_moe": {"communication": {"path": "flat", "dedup": False}, "routing": {"policy": "wrr"}},
    "qwen3_moe": {"communication": {"path": "flat", "dedup": True}},
    "deepseek_v2": {"routing": {"policy": "primary"}},
    # re-plans replicas during generation, reading the replicas from the checkpoint; the output must not change
    "mixtral": {
        "replication": {
            "online": {"enabled": True, "interval": 2, "threshold": 0.99, "window": 2, "source": "disk"}
        }
    },
}
PLAN_AT_START_UP = "deepseek_v3"  # planned by every rank from grace.profile.trace
PROFILED_FAMILY = "olmoe"  # profiled on the served engine, gathered to rank 0
PROFILE_TOKENS = 128
TOY = ToyMoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=8, k=2, num_layers=2, ep_size=4, seed=5)
TOY_TOKENS = (5, 9, 7, 11)


def _grace_block(family: str) -> dict:
    return {
        "topology": {"num_nodes": TOPOLOGY.num_nodes, "gpus_per_node": TOPOLOGY.gpus_per_node},
        "communication": {"timeout_s": 60},
        **RUNTIME_VARIANTS.get(family, {}),
    }


def _merge(block: dict, extra: dict) -> dict:
    merged = dict(block)
    for key, value in extra.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("integration")
    input_ids, attention_mask = prompt_batch(seed=1)
    cases: list = []
    expected: dict = {"reference": {}, "plan": {}}
    for index, family in enumerate(HF_FAMILIES):
        checkpoint = tiny_checkpoint(family, root / family, seed=20 + index)
        expected["reference"][family] = hf_reference(checkpoint, input_ids, attention_mask)
        model = load_checkpoint(checkpoint)
        block = _grace_block(family)
        if family == PLAN_AT_START_UP:
            trace = profile_routing(
                model, calibration_batches(index, batches=4, rows=4, length=32), tokens=512, progress=False
            )
            trace.save(root / f"{family}.npz")
            block = _merge(block, {"profile": {"trace": str(root / f"{family}.npz")}})
            expected["plan"][family] = build_plan(trace, topology=TOPOLOGY, config=parse_grace_block(block))
        else:
            policy = RUNTIME_VARIANTS.get(family, {}).get("routing", {}).get("policy", "tar")
            plan_path = plan_for(
                model, TOPOLOGY, seed=index, path=root / f"{family}.plan.json", routing_policy=policy
            )
            block = _merge(block, {"plan": {"path": str(plan_path)}})
            expected["plan"][family] = GracePlan.load(plan_path)
        profile_batches = None
        if family == PROFILED_FAMILY:
            batches = calibration_batches(77, batches=TOPOLOGY.world_size, rows=2, length=16)
            profile_batches = tuple((batch,) for batch in batches)
            expected["trace"] = profile_routing(model, batches, tokens=PROFILE_TOKENS, progress=False)
        cases.append(
            HFCase(
                name=f"{family}/grace",
                checkpoint=str(checkpoint),
                config={"dtype": "fp32", "grace": block},
                input_ids=input_ids,
                attention_mask=attention_mask,
                profile_batches=profile_batches,
                profile_tokens=PROFILE_TOKENS,
            )
        )
        cases.append(
            HFCase(f"{family}/vanilla", str(checkpoint), {"dtype": "fp32"}, input_ids, attention_mask)
        )
    small_capacity = {
        "enabled": False,
        "vanilla": {"drop_tokens": True, "eval_capacity_factor": 0.5, "min_capacity": 0},
    }
    cases.append(
        HFCase(
            "mixtral/vanilla-capacity",
            str(root / "mixtral"),
            {"dtype": "fp32", "grace": small_capacity},
            input_ids,
            attention_mask,
        )
    )

    toy_plan = build_plan(
        synthetic(
            num_layers=TOY.num_layers, num_experts=TOY.num_experts, top_k=TOY.k, num_tokens=2048, seed=3
        ),
        topology=TOPOLOGY,
    )
    toy_plan.save(root / "toy.plan.json")
    expected["plan"]["toy"] = toy_plan
    x_TD = toy_batch(sum(TOY_TOKENS), TOY.hidden_size, seed=4)
    expected["toy_y"] = reference_forward(TOY, x_TD)
    toy_reference = ToyMoEModel(replace(TOY, ep_size=1)).eval()
    configure_vanilla_gates(toy_reference, LOSSLESS)
    expected["toy_trace"] = profile_routing(toy_reference, [x_TD], tokens=x_TD.shape[0], progress=False)
    toy_block = _merge(_grace_block("toy"), {"plan": {"path": str(root / "toy.plan.json")}})
    cases.append(
        ToyCase("toy/grace", TOY, {"dtype": "fp32", "grace": toy_block}, x_TD, TOY_TOKENS, profile=True)
    )
    cases.append(ToyCase("toy/vanilla", TOY, {"dtype": "fp32"}, x_TD, TOY_TOKENS))

    per_rank = run_on_ranks(
        serve_cases_on_rank, topology=TOPOLOGY, args=(cases,), timeout_s=240, collective_timeout_s=60
    )
    by_name = {case.name: [rank_results[i] for rank_results in per_rank] for i, case in enumerate(cases)}
    return by_name, expected


@pytest.mark.parametrize("mode", ["grace", "vanilla"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_generation_and_logits_equal_single_process_transformers(served, family, mode):
    by_name, expected = served
    results = by_name[f"{family}/{mode}"]
    reference = expected["reference"][family]
    assert all(result.mode == mode for result in results)
    tokens = torch.cat([result.outputs["tokens"] for result in results])
    assert torch.equal(tokens, reference.tokens_PN), (tokens, reference.tokens_PN)
    _, attention_mask = prompt_batch(seed=1)
    real = attention_mask.bool()
    logits = torch.cat([result.outputs["logits"] for result in results])
    torch.testing.assert_close(logits[real], reference.logits_PWV[real], atol=ATOL, rtol=RTOL)


# the online family's slots follow its live plan, which re-planning changes during generation
@pytest.mark.parametrize(
    "family", [f for f in HF_FAMILIES if "online" not in RUNTIME_VARIANTS.get(f, {}).get("replication", {})]
)
def test_grace_layers_hold_the_plan_slots_and_cross_nodes(served, family):
    by_name, expected = served
    results = by_name[f"{family}/grace"]
    plan = expected["plan"][family]
    assert plan.layers[0].replica_count() > 0  # replicas are served, not just primaries
    for rank, result in enumerate(results):
        assert result.layer_types == ["GraceMoE", "GraceMoE"]
        assert result.local_experts == [len(layer.slots[rank]) for layer in plan.layers]
    inter_rows = sum(result.stats["rows_sent_inter"] for result in results)
    received = sum(result.stats["rows_recv_inter"] for result in results)
    assert inter_rows > 0 and inter_rows == received


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_vanilla_layers_are_deepspeed_moe_with_contiguous_experts(served, family):
    by_name, _ = served
    for result in by_name[f"{family}/vanilla"]:
        assert result.layer_types == ["MoE", "MoE"]
        assert result.local_experts == [2, 2]  # 8 experts over 4 ranks
        assert result.stats["dropped_routes"] == 0 and result.stats["routes"] > 0


def test_vanilla_with_small_capacity_drops_routes(served):
    by_name, expected = served
    results = by_name["mixtral/vanilla-capacity"]
    routes = sum(result.stats["routes"] for result in results)
    dropped = sum(result.stats["dropped_routes"] for result in results)
    # prefill, 2 MoE layers: 8 prompts x 9 positions x top-2 routes each
    assert routes == 2 * 8 * 9 * 2 and 0 < dropped < routes
    logits = torch.cat([result.outputs["logits"] for result in results])
    assert not torch.allclose(logits, expected["reference"]["mixtral"].logits_PWV, atol=ATOL, rtol=RTOL)


def test_plan_built_at_start_up_is_the_same_on_every_rank(served):
    by_name, expected = served
    results = by_name[f"{PLAN_AT_START_UP}/grace"]
    plan = expected["plan"][PLAN_AT_START_UP]
    for rank, result in enumerate(results):
        assert result.local_experts == [len(layer.slots[rank]) for layer in plan.layers]


def _assert_same_trace(gathered, trace) -> None:
    ids, weights = gathered
    assert [layer.shape for layer in ids] == [layer.shape for layer in trace.topk_ids]
    for layer in range(trace.num_layers):
        np.testing.assert_array_equal(ids[layer], trace.topk_ids[layer])
        np.testing.assert_allclose(weights[layer], trace.gate_weights[layer], atol=1e-5, rtol=1e-4)


def test_profiling_on_served_engine_is_gathered_to_rank_zero(served):
    by_name, expected = served
    results = by_name[f"{PROFILED_FAMILY}/grace"]
    assert all(result.trace is None for result in results[1:])
    _assert_same_trace(results[0].trace, expected["trace"])
    assert results[0].trace[0][0].shape[0] == PROFILE_TOKENS


@pytest.mark.parametrize("mode", ["grace", "vanilla"])
def test_deepspeed_moe_model_served_both_ways(served, mode):
    by_name, expected = served
    results = by_name[f"toy/{mode}"]
    y_TD = torch.cat([result.outputs["y"] for result in results])
    torch.testing.assert_close(y_TD, expected["toy_y"], atol=ATOL, rtol=RTOL)
    plan = expected["plan"]["toy"]
    for rank, result in enumerate(results):
        if mode == "grace":
            assert result.layer_types == ["GraceMoE", "GraceMoE"]
            assert result.local_experts == [len(layer.slots[rank]) for layer in plan.layers]
        else:
            assert result.layer_types == ["MoE", "MoE"] and result.local_experts == [2, 2]
    if mode == "grace":
        assert all(result.trace is None for result in results[1:])
        _assert_same_trace(results[0].trace, expected["toy_trace"])


def test_online_replication_steps_with_every_forward_and_keeps_outputs(served):
    by_name, expected = served
    metrics = [result.stats_online for result in by_name["mixtral/grace"]]
    forwards = 1 + 6  # prefill logits, then generate's prefill + 5 decode steps
    for rank_metrics in metrics:
        assert rank_metrics["step"] == forwards
        assert len(rank_metrics["intervals"]) == forwards // 2
    assert len({m["plan_hash"] for m in metrics}) == 1, "every rank serves the same live plan"
    assert metrics[0]["plan_hash"] != expected["plan"]["mixtral"].content_hash, "load was re-planned"
    migrations = [m["migrations"] for m in metrics]
    assert migrations[0] and all(len(m) == len(migrations[0]) for m in migrations)
    for first in (m[0] for m in migrations):
        assert first["source"] == "disk" and first["bytes_from_peers"] == 0 and first["cross_node_bytes"] == 0
        assert first["bytes_read_from_disk"] == first["bytes_moved"] > 0
    # the replicas that moved in were read by their destinations, and by no one else
    assert sum(m[0]["rank_bytes_read_from_disk"] for m in migrations) == migrations[0][0]["bytes_moved"]
    assert all(r.stats_online is None for r in by_name["qwen3_moe/grace"])
