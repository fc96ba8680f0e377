import json

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
    out_dir = tmp_path / "report"
    assert (
        cli_main(["report", str(plan_path), "--trace", mixtral, "--out", str(out_dir), "--layer", "3"]) == 0
    )
    for name in ("affinity.png", "gpu_load.png", "placement.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary_md = (out_dir / "summary.md").read_text()
    assert "cross_node_copies_per_token" in summary_md and "contiguous (DeepSpeed)" in summary_md


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
    assert cli_main(["plan", "--trace", mixtral, "--nodes", "4", "--gpus-per-node", "4", "--out", out]) == 2
    assert "num_experts (8) must be >= the world size (16)" in capsys.readouterr().err
    assert cli_main(["evaluate", "--trace", mixtral, "--plan", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
