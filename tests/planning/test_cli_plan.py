import json
import re

import pytest

from ds_grace.cli import main as cli_main
from ds_grace.planning.metrics import METRIC_KEYS
from ds_grace.planning.plan import GracePlan
from ds_grace.trace import packaged_traces_dir, synthetic

TRACES = packaged_traces_dir()
MIXTRAL_JSONL = str(TRACES / "mixtral" / "gsm8k_2_routing.jsonl")
OLMOE = str(TRACES / "olmoe" / "expert_counts" / "github.json")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    """The shipped Mixtral gsm8k trace, imported to .npz as a user would (plan reads the npz)."""
    out = tmp_path_factory.mktemp("traces") / "gsm8k.npz"
    assert cli_main(["import-trace", MIXTRAL_JSONL, "--num-experts", "8", "--out", str(out)]) == 0
    return str(out)


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plan_evaluate_report_end_to_end(tmp_path, capsys, mixtral):
    plan_path = tmp_path / "plan.json"
    assert (
        cli_main(
            ["plan", "--trace", mixtral, "--nodes", "2", "--gpus-per-node", "2", "--out", str(plan_path)]
        )
        == 0
    )
    summary = _json_out(capsys)
    plan = GracePlan.load(plan_path)
    assert summary["content_hash"] == plan.content_hash and summary["policy"] == "grace"
    assert cli_main(["evaluate", "--trace", mixtral, "--plan", str(plan_path), "--json"]) == 0
    metrics = _json_out(capsys)
    assert set(METRIC_KEYS) <= set(metrics) and metrics["trace_matches_plan"] is True
    assert 0.0 < metrics["cross_node_copies_per_token"] < metrics["vanilla_cross_node_copies_per_token"]
    assert 0.0 < metrics["balancedness_replayed"] <= 1.0
    assert 0.0 < metrics["cross_node_copies_replayed"] < metrics["vanilla_cross_node_copies_per_token"]
    out_dir = tmp_path / "report"
    assert (
        cli_main(["report", str(plan_path), "--trace", mixtral, "--out", str(out_dir), "--layer", "3"]) == 0
    )
    for name in ("affinity.png", "gpu_load.png", "placement.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary_md = (out_dir / "summary.md").read_text()
    assert "cross_node_copies_per_token" in summary_md and "DeepSpeed-MoE (contiguous" in summary_md


def test_baseline_policies_and_npz_traces(tmp_path, capsys):
    trace_path = tmp_path / "trace.npz"
    synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=300).save(trace_path)
    for policy in ("contiguous", "occult", "eplb"):
        out = tmp_path / f"{policy}.json"
        code = cli_main(
            [
                "plan",
                "--trace",
                str(trace_path),
                "--nodes",
                "2",
                "--gpus-per-node",
                "2",
                "--policy",
                policy,
                "--extra-slots-per-gpu",
                "1",
                "--out",
                str(out),
            ]
        )
        assert code == 0 and GracePlan.load(out).policy == policy
    capsys.readouterr()
    assert cli_main(["evaluate", "--trace", str(trace_path), "--plan", str(tmp_path / "eplb.json")]) == 0
    assert "balancedness" in capsys.readouterr().out


def test_loads_only_trace(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        cli_main(["plan", "--trace", OLMOE, "--nodes", "2", "--gpus-per-node", "2", "--out", str(out)]) == 2
    )
    assert "--derive-tokens N" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "plan",
                "--trace",
                OLMOE,
                "--nodes",
                "2",
                "--gpus-per-node",
                "2",
                "--out",
                str(out),
                "--derive-tokens",
                "2048",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli_main(["evaluate", "--trace", OLMOE, "--plan", str(out), "--json"]) == 0
    metrics = _json_out(capsys)
    assert metrics["cross_node_copies_per_token"] is None and metrics["cross_gpu_copies_per_token"] is None
    assert metrics["balancedness_replayed"] is None and metrics["cross_node_copies_replayed"] is None
    assert metrics["balancedness"] > 0.9 and metrics["trace_matches_plan"] is True
    assert metrics["vanilla_cross_node_copies_per_token"] == pytest.approx(4.0)
    assert cli_main(["report", str(out), "--trace", OLMOE, "--out", str(tmp_path / "r")]) == 0
    assert not (tmp_path / "r" / "affinity.png").exists()
    assert "loads only" in (tmp_path / "r" / "summary.md").read_text()


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys, mixtral):
    out = str(tmp_path / "p.json")
    assert (
        cli_main(
            [
                "plan",
                "--trace",
                str(tmp_path / "none.npz"),
                "--nodes",
                "2",
                "--gpus-per-node",
                "2",
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["plan", "--trace", mixtral, "--nodes", "0", "--gpus-per-node", "2", "--out", out]) == 2
    assert "topology.num_nodes (0) must be an integer >= 1" in capsys.readouterr().err
    assert (
        cli_main(
            ["plan", "--trace", mixtral, "--nodes", "2", "--gpus-per-node", "2", "--ratio", "2", "--out", out]
        )
        == 2
    )
    assert "grace.grouping.ratio (2.0) must be in [0, 1]" in capsys.readouterr().err
    args = ["plan", "--trace", mixtral, "--nodes", "4", "--gpus-per-node", "4", "--out", out]
    assert cli_main([*args, "--policy", "contiguous"]) == 2
    assert "num_experts (8) must be >= the world size (16)" in capsys.readouterr().err
    assert cli_main([*args, "--slots-per-gpu", "9"]) == 2
    assert (
        "grace.replication.slots_per_gpu (9) must be in [ceil(E / GPUs) = 1, E = 8]"
        in capsys.readouterr().err
    )
    assert cli_main(args) == 0  # fewer experts than GPUs: copies on every GPU
    assert cli_main(["evaluate", "--trace", mixtral, "--plan", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_slots_per_gpu_gives_equal_memory_on_every_gpu(tmp_path, capsys):
    trace_path = tmp_path / "trace.npz"
    synthetic(num_layers=2, num_experts=16, top_k=2, num_tokens=400, skew=1.2).save(trace_path)
    base = ["plan", "--trace", str(trace_path), "--nodes", "2", "--gpus-per-node", "2"]
    for policy in ("grace", "eplb"):
        out = tmp_path / f"{policy}.json"
        assert cli_main([*base, "--policy", policy, "--slots-per-gpu", "6", "--out", str(out)]) == 0
        assert _json_out(capsys)["slots_per_gpu"] == [6]
        assert {len(s) for layer in GracePlan.load(out).layers for s in layer.slots} == {6}
    assert cli_main([*base, "--out", str(tmp_path / "d.json")]) == 0
    assert _json_out(capsys)["slots_per_gpu"] == [5]  # default: ceil(16 / 4) + 1
    for slots, message in [
        ("3", r"slots_per_gpu \(3\) must be in \[ceil\(E / GPUs\) = 4, E = 16\]"),
        ("17", r"slots_per_gpu \(17\) must be in \[ceil\(E / GPUs\) = 4, E = 16\]"),
    ]:
        assert cli_main([*base, "--slots-per-gpu", slots, "--out", str(tmp_path / "x.json")]) == 2
        assert re.search(message, capsys.readouterr().err)
    args = [*base, "--slots-per-gpu", "6", "--extra-slots-per-gpu", "1", "--out", str(tmp_path / "x.json")]
    assert cli_main(args) == 2
    assert (
        "extra_slots_per_gpu (1) must equal grace.replication.slots_per_gpu (6) - ceil(E / GPUs) (4) = 2"
        in (capsys.readouterr().err)
    )
    args = [*base, "--slots-per-gpu", "6", "--replication-mode", "paper", "--out", str(tmp_path / "x.json")]
    assert cli_main(args) == 2
    assert "slots_per_gpu (6) is set but replication mode is 'paper'" in capsys.readouterr().err


def test_report_puts_in_sample_next_to_held_out(tmp_path, capsys, mixtral):
    first, rest = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    assert cli_main(["split-trace", mixtral, "--fraction", "0.5", "--out", first, rest]) == 0
    plan = str(tmp_path / "plan.json")
    assert cli_main(["plan", "--trace", first, "--nodes", "2", "--gpus-per-node", "2", "--out", plan]) == 0
    out_dir = tmp_path / "report"
    assert cli_main(["report", plan, "--trace", first, "--held-out", rest, "--out", str(out_dir)]) == 0
    assert (out_dir / "held_out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out_dir / "summary.md").read_text()
    rows = {
        line.split(" | ")[0][2:]: line for line in summary.splitlines() if line.startswith("| balancedness")
    }
    assert set(rows) == {"balancedness", "balancedness_replayed"}
    in_sample, held_out = (float(x) for x in rows["balancedness"].strip(" |").split(" | ")[1:])
    assert 0.0 < held_out <= 1.0 and 0.0 < in_sample <= 1.0
    capsys.readouterr()
    assert cli_main(["report", plan, "--trace", first, "--held-out", OLMOE, "--out", str(out_dir)]) == 2
    assert "held-out trace has 3 layers of 64 experts but the plan has 32 of 8" in capsys.readouterr().err
