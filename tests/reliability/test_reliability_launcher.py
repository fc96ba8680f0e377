"""Through the real `deepspeed` launcher (two nodes of one rank each, --no_ssh, one launcher per node):
nodes whose ds_configs differ in settings that change the collectives, or that were launched with other
prompts or new tokens, refuse to serve at start-up, on every rank, with the field and each rank's value,
well before the collective timeout (300 s here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ds_grace.cluster.node_launchers import NodeLaunch, run_node_launchers
from ds_grace.models import tiny_checkpoint
from ds_grace.trace import synthetic

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE = REPO_ROOT / "launch" / "generate.py"


def _launch_nodes(tmp_path: Path, scripts: list[list[str]]) -> NodeLaunch:
    """One deepspeed launcher per node (one rank each, --no_ssh); `scripts[i]` is node i's script line."""
    return run_node_launchers(
        node_scripts=scripts,
        ranks_per_node=1,
        workdir=tmp_path,
        timeout_s=240,
        env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)},
    )


@pytest.mark.slow
def test_nodes_with_different_settings_refuse_to_serve_on_every_rank(tmp_path):
    model = tiny_checkpoint("qwen3_moe", tmp_path / "qwen3_moe", seed=3)
    synthetic(num_layers=2, num_experts=8, top_k=4, num_tokens=256, seed=3).save(tmp_path / "trace.npz")

    def config(*, hierarchical: bool, interval: int) -> dict:
        return {
            "dtype": "fp32",
            "grace": {
                "profile": {"trace": str(tmp_path / "trace.npz")},
                "communication": {"path": "hierarchical" if hierarchical else "flat"},
                "replication": {"online": {"enabled": True, "interval": interval}},
            },
        }

    # the two nodes also differ in their launch arguments (a third prompt, --max-new-tokens): the same
    # start-up fingerprint carries them, so one launch checks both kinds of field
    prompts = ["--prompt", "GRACE moves experts", "--prompt", "MoE"]
    launch_args = [[*prompts, "--prompt", "the third", "--max-new-tokens", "4"],
                   [*prompts, "--prompt", "another third", "--max-new-tokens", "12"]]  # fmt: skip
    scripts = []
    for node_rank, node_config in enumerate(
        [config(hierarchical=True, interval=64), config(hierarchical=False, interval=8)]
    ):
        path = tmp_path / f"node{node_rank}.json"
        path.write_text(json.dumps(node_config))
        scripts.append(
            [str(GENERATE), "--model", str(model), "--ds-config", str(path), *launch_args[node_rank], "--warmup", "0"]
        )  # fmt: skip
    run = _launch_nodes(tmp_path, scripts)
    codes, outputs, wall_s, shown = run.exit_codes, run.outputs, run.wall_s, run.shown(tail_chars=3000)
    assert codes == [2, 2], shown
    for rank, text in enumerate(outputs):  # the same clear error on every rank, and no rank serves
        [line] = [line for line in text.splitlines() if line.startswith("error: ")]
        assert line.startswith(f"error: rank {rank} (host "), shown
        assert re.match(r"error: rank [01] \(host \S+\): ranks disagree on what they serve with", line), shown
        assert "ranks disagree on what they serve with, so no rank serves" in line, shown
        assert "Traceback" not in text, shown
        assert not [out for out in text.splitlines() if out.startswith("{")], shown  # no report
        assert "grace.communication.path differs: hierarchical on rank 0; flat on rank 1" in line, shown
        assert "grace.replication.online.interval differs: 64 on rank 0; 8 on rank 1" in line, shown
        assert "launch.prompt[2] differs: the third on rank 0; another third on rank 1" in line, shown
        assert "launch.max_new_tokens differs: 4 on rank 0; 12 on rank 1" in line, shown
        assert "launch.prompt[0]" not in line, shown  # equal prompts are not named
        assert "collective mismatch" not in text and "Connection reset" not in text, shown
    assert wall_s < 150, f"took {wall_s:.0f} s: the mismatch must fail at start-up, not at timeout_s (300 s)"


@pytest.mark.slow
def test_a_killed_rank_is_named_by_the_survivors(tmp_path):
    script = [str(Path(__file__).with_name("lost_rank_rank.py"))]
    run = _launch_nodes(tmp_path, [script, script, script])
    codes, outputs, wall_s, shown = run.exit_codes, run.outputs, run.wall_s, run.shown(tail_chars=3000)
    assert codes[2] != 0 and codes[0] == 1 and codes[1] == 1, (codes, shown)
    for survivor in outputs[:2]:
        lines = [line for line in survivor.splitlines() if "error: " in line]
        assert len(lines) == 1, shown
        assert re.search(
            r"^error: rank 2 \(host \S+, pid \d+\) stopped answering: its process exited\. Rank [01] stopped "
            r"serving too; the launcher shuts down the remaining ranks \(collective error: ",
            lines[0],
        ), shown
        assert "Traceback" not in survivor, shown
    assert wall_s < 60, f"took {wall_s:.0f} s: survivors must not wait for the collective timeout (60 s)"
