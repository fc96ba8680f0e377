"""The benchmark's systems (equal memory, the peers' plans and rules) and the whole-model replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.e2e import E2E_BY_NAME, ReplaySchedule, aligned_replay, install_replay, system_block
from benchmarks.systems import SYSTEM_BY_NAME, SYSTEMS, build_plans, slot_range
from benchmarks.workloads import calibration_and_replay
from ds_grace.planning.build import build_plan
from ds_grace.topology import Topology

TOPOLOGY = Topology(2, 2)


def test_peers_get_every_generic_rule_and_their_engines_instance_choice() -> None:
    options = {s.name: s.runtime_options(timeout_s=30.0) for s in SYSTEMS if s.kind == "grace"}
    for name, option in options.items():
        # the low-latency buffer with its primary-copy rule: every sparse system, not only GRACE
        assert option.low_latency_max_tokens == 64 and option.low_latency_policy == "primary", name
        assert option.dedup, name
    vllm, sglang, grace = options["peer_vllm"], options["peer_sglang"], options["grace"]
    assert (vllm.policy, vllm.path) == ("wrr", "flat")
    assert (sglang.policy, sglang.path) == ("tar", "auto")
    assert (grace.policy, grace.path) == ("tar", "auto")
    # the per-forward path choice on every peer with a hierarchical path; the ladder's rungs stay fixed
    assert options["peer_deepep"].path == options["peer_eplb_deepep"].path == "auto"
    assert options["grace_hsc"].path == "hierarchical"
    assert SYSTEM_BY_NAME["peer_vllm"].plan == SYSTEM_BY_NAME["peer_sglang"].plan == "eplb_global"


@pytest.mark.parametrize("model", ["mixtral", "qwen15"])
def test_every_replicated_plan_holds_exactly_s_slots_per_gpu_at_every_s(model: str) -> None:
    calibration, _ = calibration_and_replay(model)
    values = slot_range(calibration.num_experts, TOPOLOGY)
    for slots in (values[0], values[-1]) if model == "qwen15" else values:
        plans = build_plans(calibration, TOPOLOGY, SYSTEMS, slots_per_gpu=slots)
        for key in ("eplb", "eplb_global", "replicated_wrr", "replicated_tar"):
            for layer in plans[key].layers:
                assert [len(s) for s in layer.slots] == [slots] * TOPOLOGY.world_size, (key, slots)
        assert all(len(s) <= slots for layer in plans["grouping"].layers for s in layer.slots)
    # the vLLM/SGLang plan is EPLB's global policy (one group), as those engines build it here
    global_plan = build_plan(calibration, topology=TOPOLOGY, policy="eplb", routing_policy="wrr",
                             replication={"slots_per_gpu": values[-1]}, eplb_num_groups=1)  # fmt: skip
    assert global_plan.layers == plans["eplb_global"].layers


def test_mixtral_replay_rows_are_one_token_at_every_layer() -> None:
    model = E2E_BY_NAME["e2e-mixtral"]
    calibration, ids_NLK, weights_NLK = aligned_replay(model)
    assert ids_NLK.shape[1:] == (32, 2) and weights_NLK.shape == ids_NLK.shape
    assert calibration.num_layers == 32 and len(ids_NLK) > 200
    _, replay = __import__("benchmarks.workloads", fromlist=["mixtral_halves"]).mixtral_halves()
    # token by token: row n's ids at layer l are the recorded ids of that token at layer l
    token = sorted(set(replay.token_ids[0].tolist()) & set(replay.token_ids[31].tolist()))[5]
    for layer in (0, 31):
        row = int(np.flatnonzero(replay.token_ids[layer] == token)[0])
        assert (replay.topk_ids[layer][row] == ids_NLK[5, layer]).all()
    np.testing.assert_allclose(weights_NLK.sum(axis=-1), 1.0, atol=1e-2)  # Mixtral renormalises its top-2


def test_replay_schedule_feeds_prefill_then_one_row_per_sequence_per_step() -> None:
    ids_NLK = np.arange(40 * 3 * 2).reshape(40, 3, 2) % 8
    weights_NLK = np.full((40, 3, 2), 0.5, dtype=np.float32)
    schedule = ReplaySchedule(ids_NLK, weights_NLK, num_experts=8, sequences=[1, 2], prompt=4, steps=3)
    ids, weights = schedule.current(1)
    assert ids.shape == (8, 2) and weights.shape == (8, 2)
    # sequence 1 starts at recorded token 1 x (4 + 3) = 7
    assert (ids[0] == torch.from_numpy(ids_NLK[7, 1])).all() and (
        ids[4] == torch.from_numpy(ids_NLK[14, 1])
    ).all()
    schedule.set_step(2)  # decode step 2: prompt position 4 + 1
    ids, _ = schedule.current(2)
    assert ids.shape == (2, 2)
    assert (ids[0] == torch.from_numpy(ids_NLK[12, 2])).all() and (
        ids[1] == torch.from_numpy(ids_NLK[19, 2])
    ).all()


def test_replayed_routing_reaches_the_experts_of_a_real_model(tmp_path) -> None:
    from ds_grace.models import convert_moe_blocks, load_checkpoint, tiny_checkpoint

    checkpoint = tiny_checkpoint("mixtral", tmp_path / "m", seed=0)
    model = load_checkpoint(checkpoint)
    blocks = convert_moe_blocks(model)
    rng = np.random.default_rng(0)
    ids_NLK = np.stack([rng.permutation(8)[:2] for _ in range(20 * 2)]).reshape(20, 2, 2)
    weights_NLK = np.full((20, 2, 2), 0.5, dtype=np.float32)
    schedule = ReplaySchedule(ids_NLK, weights_NLK, num_experts=8, sequences=[0, 1], prompt=3, steps=2)
    install_replay(blocks, schedule)
    seen = []
    for block in blocks:
        block.routing_callback = lambda layer, ids, weights: seen.append((layer, ids.clone()))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (2, 3)))
    assert [layer for layer, _ in seen] == [0, 1]
    for layer, ids in seen:
        expected = np.concatenate([ids_NLK[0:3, layer], ids_NLK[5:8, layer]])
        assert (ids.numpy() == expected).all()


def test_system_blocks_serve_each_system_as_the_layer_benchmark_does(tmp_path) -> None:
    block = system_block("peer_vllm", plan_path=tmp_path / "p.json", topology=TOPOLOGY, timeout_s=30.0)
    assert block["enabled"] and block["routing"] == {"policy": "wrr"}
    assert block["communication"]["path"] == "flat" and block["plan"] == {"path": str(tmp_path / "p.json")}
    grace = system_block("grace", plan_path=tmp_path / "g.json", topology=TOPOLOGY, timeout_s=30.0)
    assert "routing" not in grace and grace["communication"] == {"timeout_s": 30.0}  # the default block
    vanilla = system_block("vanilla_lossless", plan_path=None, topology=TOPOLOGY, timeout_s=30.0)
    assert vanilla["enabled"] is False and vanilla["vanilla"]["drop_tokens"] is False


@pytest.mark.multirank
@pytest.mark.slow
def test_e2e_quick_generates_with_every_system_through_init_inference(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    output = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ds_grace.cli", "bench", "--e2e", "--quick", "--mode", "local", "--output",
         str(output), "--no-readme", "--quiet", "--timeout-s", "400", "--systems", "vanilla_lossless", "peer_vllm",
         "grace", "--models", "mixtral"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    document = json.loads(output.read_text())
    rows = document["rows"]
    assert {(r["workload"], r["system"]) for r in rows} == {
        ("e2e-mixtral", s) for s in ("vanilla_lossless", "peer_vllm", "grace")
    }
    for row in rows:
        assert row["ttft_ms"] > 0 and row["decode_step_ms"] > 0 and row["run_medians_ms"] == [row["ttft_ms"]]
        assert row["dropped_routes"] == 0 and row["routes"] > 0 and row["parity"], row
        assert row["token_mismatches"] == 0
    grace = next(r for r in rows if r["system"] == "grace" and r["workload"] == "e2e-mixtral")
    assert grace["ttft_ms_best_new_peer"] == "peer_vllm" and grace["slots_per_gpu"] == 3
    assert "replays" in grace["layers"]
    assert {c["workload"] for c in document["target"]["checks"]} == {"e2e-mixtral"}


def _e2e_document(ttft: dict[str, float], order_seed: int) -> dict:
    from benchmarks.bench import Setting
    from benchmarks.e2e import build_e2e_rows, e2e_check

    spec = {"order_seed": order_seed,
            "models": [{"workload": "e2e-mixtral", "layer_label": "32 MoE layers", "slots_per_gpu": 3}]}  # fmt: skip
    results = {"e2e-mixtral": {}}
    for name, value in ttft.items():
        dropped = 4 if name == "vanilla_default" else 0
        results["e2e-mixtral"][name] = {
            "ttft_ms": value, "decode_step_ms": value / 10, "per_repetition_ttft_ms": [value] * 2,
            "per_repetition_decode_step_ms": [value / 10] * 2, "max_abs_diff": 1e-6, "token_mismatches": 0,
            "dropped_routes": dropped, "routes": 100, "bytes_cross_node": 5.0, "bytes_intra_node": 1.0,
        }  # fmt: skip
    setting = Setting("50mbit", "netns", 50.0)
    rows = build_e2e_rows(spec, setting, results)
    return {"e2e": True, "rows": rows, "settings": [vars(setting)], "wall_s": 1.0, "cluster_runs": [],
            "order_seed": order_seed, "target": e2e_check(rows)}  # fmt: skip


def test_e2e_rows_aggregate_over_runs_and_check_the_targets() -> None:
    from benchmarks.bench import aggregate_runs
    from benchmarks.e2e import format_e2e_table

    runs = [
        {"vanilla_lossless": 300.0, "vanilla_default": 200.0, "peer_vllm": 120.0, "peer_sglang": 110.0, "grace": 100.0},
        {"vanilla_lossless": 330.0, "vanilla_default": 210.0, "peer_vllm": 100.0, "peer_sglang": 115.0, "grace": 105.0},
        {"vanilla_lossless": 310.0, "vanilla_default": 190.0, "peer_vllm": 130.0, "peer_sglang": 112.0, "grace": 90.0},
    ]  # fmt: skip
    document = aggregate_runs([_e2e_document(r, i) for i, r in enumerate(runs)])
    by = {row["system"]: row for row in document["rows"]}
    assert by["grace"]["ttft_ms"] == 100.0 and by["grace"]["run_ttft_ms"] == [100.0, 105.0, 90.0]
    assert by["grace"]["run_medians_ms"] == [100.0, 105.0, 90.0]
    assert by["peer_sglang"]["ttft_ms"] == 112.0 and by["peer_vllm"]["ttft_ms"] == 120.0
    assert by["grace"]["ttft_ms_vs_best_new_peer"] == pytest.approx(1.12)
    assert by["grace"]["ttft_ms_vs_best_new_peer_range"] == pytest.approx([100.0 / 105.0, 112.0 / 90.0])
    assert by["grace"]["ttft_ms_vs_vanilla_lossless"] == pytest.approx(3.1)
    (check,) = document["target"]["checks"]
    assert check["ttft_met"] and check["ttft_vs_vanilla_met"] and check["all_rows_lossless"]
    assert by["vanilla_default"]["dropped_routes"] == 12  # drops add up over runs
    assert "| e2e-mixtral | 50mbit | GRACE (full, default block) | 100.0 (90.0-105.0) |" in format_e2e_table(
        document
    )


def test_e2e_plans_name_the_instance_choice_each_system_serves_them_with(tmp_path) -> None:
    from benchmarks.e2e import prepare_e2e
    from ds_grace.planning.plan import GracePlan

    spec = prepare_e2e(tmp_path, topology=TOPOLOGY, systems=["vanilla_lossless", "peer_sglang", "peer_vllm", "grace"],
                       quick=True, seed=0, order_seed=0, timeout_s=30.0, trace_models=("mixtral",))  # fmt: skip
    (model,) = spec["models"]
    assert model["workload"] == "e2e-mixtral" and model["slots_per_gpu"] == 3
    assert model["blocks"]["vanilla_lossless"]["enabled"] is False
    for name, policy in (("peer_sglang", "tar"), ("peer_vllm", "wrr"), ("grace", "tar")):
        plan = GracePlan.load(model["blocks"][name]["plan"]["path"])
        assert plan.meta["routing_policy"] == policy, name
        assert {len(s) for layer in plan.layers for s in layer.slots} == {3}
    sglang = GracePlan.load(model["blocks"]["peer_sglang"]["plan"]["path"])
    vllm = GracePlan.load(model["blocks"]["peer_vllm"]["plan"]["path"])
    assert sglang.layers == vllm.layers  # one global EPLB plan, two instance choices
