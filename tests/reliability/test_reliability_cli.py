"""Every refused input is one `error: ...` line and exit code 2, never a traceback; check-config refuses
exactly what init_inference refuses before its first collective (both run ds_grace.preflight)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import ds_grace
import ds_grace.inference as inference
from ds_grace.cli import main as cli_main
from ds_grace.models import tiny_checkpoint
from ds_grace.planning.plan import GracePlan, LayerPlan
from ds_grace.topology import Topology
from ds_grace.trace import synthetic

REPO_ROOT = Path(__file__).resolve().parents[2]


def _error_line(capsys) -> str:
    """The one `error: ...` line of stderr (library notices and progress bars may precede it)."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err, captured.err
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], captured.err
    assert lines[-1].startswith("error: "), captured.err
    return lines[-1]


def _cli_fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        code = cli_main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    return _error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["check-config", "c.json", "--world-size", "0"],
            "argument --world-size: (0) must be an integer >= 1",
        ),
        (
            ["check-config", "c.json", "--world-size", "-4"],
            "argument --world-size: (-4) must be an integer >= 1",
        ),
        (
            ["check-config", "c.json", "--world-size", "two"],
            "argument --world-size: ('two') must be an integer",
        ),
        (["no-such-command"], "argument COMMAND: invalid choice: 'no-such-command'"),
        (["check-config"], "the following arguments are required: config"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, expected):
    assert expected in _cli_fails(capsys, argv)


def test_bad_files_are_one_line(capsys, tmp_path, monkeypatch):
    assert _cli_fails(capsys, ["check-config", str(tmp_path)]) == (
        f"error: ds_config file ({tmp_path}) is a directory, not a JSON file"
    )
    out = tmp_path / "missing" / "plan.json"
    synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=64).save(tmp_path / "trace.npz")
    trace = str(tmp_path / "trace.npz")
    line = _cli_fails(
        capsys, ["plan", "--trace", trace, "--nodes", "2", "--gpus-per-node", "2", "--out", str(out)]
    )
    assert line == f"error: cannot write {out}: No such file or directory"
    vanilla = tmp_path / "vanilla.json"
    vanilla.write_text(json.dumps({"dtype": "fp32", "grace": {"enabled": False}}))
    monkeypatch.setenv("LOCAL_SIZE", "abc")
    assert _cli_fails(capsys, ["check-config", str(vanilla)]) == (
        "error: environment variable LOCAL_SIZE ('abc') must be an integer >= 1 "
        '(it resolves grace.topology "auto" fields)'
    )


def test_a_real_bug_keeps_its_traceback(monkeypatch, tmp_path):
    import ds_grace.commands.check_config as check_config

    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("a bug, not an input error")

    monkeypatch.setattr(check_config, "load_ds_config", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli_main(["check-config", str(tmp_path / "c.json")])


def test_console_script_prints_no_traceback(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"dtype": "fp32", "grace": {"communication": {"timeout_s": float("inf")}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "ds_grace.cli", "check-config", str(config), "--world-size", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: grace.communication.timeout_s (Infinity) must be a finite number"
    )


# ---- check-config == init_inference's checks ----


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return tiny_checkpoint("mixtral", tmp_path_factory.mktemp("cli") / "mixtral", seed=1)


def _plan(topology: Topology, *, num_experts: int = 8, num_layers: int = 2) -> GracePlan:
    per_rank = num_experts // topology.world_size
    layer = LayerPlan.from_lists(
        slots=[list(range(r * per_rank, (r + 1) * per_rank)) for r in range(topology.world_size)],
        primary=[e // per_rank for e in range(num_experts)],
    )
    return GracePlan(topology=topology, layers=(layer,) * num_layers)


def _cases(tmp: Path) -> dict[str, tuple[dict, str]]:
    _plan(Topology(2, 2)).save(tmp / "plan.json")
    synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=64).save(tmp / "trace.npz")
    good = {"plan": {"path": str(tmp / "plan.json")}}
    return {
        "plan file missing": (
            {"dtype": "fp32", "grace": {"plan": {"path": str(tmp / "nowhere.json")}}},
            f"plan file ({tmp / 'nowhere.json'}) does not exist",
        ),
        "trace file missing": (
            {"dtype": "fp32", "grace": {"profile": {"trace": str(tmp / "nowhere.npz")}}},
            f"trace file ({tmp / 'nowhere.npz'}) does not exist",
        ),
        "no plan and no trace": ({"dtype": "fp32", "grace": {}}, "grace.plan.path and grace.profile.trace"),
        "fp16 on CPU": ({"dtype": "fp16", "grace": good}, "dtype ('fp16') must be fp32 or bf16 on CPU"),
        "kernel injection": (
            {"dtype": "fp32", "replace_with_kernel_inject": True, "grace": good},
            "replace_with_kernel_inject / injection_policy must be unset",
        ),
        "tp_size 2": (
            {"dtype": "fp32", "tensor_parallel": {"tp_size": 2}, "grace": good},
            "tensor_parallel.tp_size (2) must be 1",
        ),
        "unknown DeepSpeed key": (
            {"dtype": "fp32", "no_such_key": 1, "grace": good},
            "ds_config is not a valid DeepSpeed inference config",
        ),
        "moe.ep_size 8 on 4 ranks": (
            {"dtype": "fp32", "moe": {"ep_size": 8}, "grace": good},
            "moe.ep_size (8) must be 4: GRACE spreads the experts over every rank",
        ),
        "vanilla moe.ep_size": (
            {"dtype": "fp32", "moe": {"ep_size": 2}, "grace": {"enabled": False}},
            "moe.ep_size (2) must be 4: vanilla DeepSpeed-MoE spreads",
        ),
        "timeout 1e300": (
            {"dtype": "fp32", "grace": {**good, "communication": {"timeout_s": 1e300}}},
            "grace.communication.timeout_s (1e+300) must be less than or equal to 86400",
        ),
        "plan for another topology": (
            {"dtype": "fp32", "grace": {"topology": {"num_nodes": 1, "gpus_per_node": 4}, **good}},
            "topology (2 nodes x 2 GPUs) does not match the cluster topology (1 nodes x 4 GPUs)",
        ),
    }


CASE_NAMES = [
    "plan file missing",
    "trace file missing",
    "no plan and no trace",
    "fp16 on CPU",
    "kernel injection",
    "tp_size 2",
    "unknown DeepSpeed key",
    "moe.ep_size 8 on 4 ranks",
    "vanilla moe.ep_size",
    "timeout 1e300",
    "plan for another topology",
]


@pytest.fixture
def launcher_env(monkeypatch):
    """4 ranks (2 nodes x 2) in the environment, no process group; reaching the start-up fails."""
    assert not dist.is_initialized()

    def reached(**_kwargs):
        pytest.fail("init_inference reached the distributed start-up before refusing the set-up")

    monkeypatch.setattr(inference, "init_distributed", reached)
    for name, value in {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_SIZE": "2", "CROSS_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_check_config_refuses_what_init_inference_refuses(name, mixtral, tmp_path, capsys, launcher_env):
    config, expected = _cases(tmp_path)[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    line = _cli_fails(capsys, ["check-config", str(path)])
    assert expected in line
    with pytest.raises(ValueError) as info:
        ds_grace.init_inference(str(mixtral), config=str(path))
    assert f"error: {' '.join(str(info.value).split())}" == line


def test_check_config_with_model_checks_the_plan_against_it(mixtral, tmp_path, capsys, launcher_env):
    _plan(Topology(2, 2), num_layers=3).save(tmp_path / "plan.json")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dtype": "fp32", "grace": {"plan": {"path": str(tmp_path / "plan.json")}}}))
    assert cli_main(["check-config", str(path)]) == 0  # without --model: the plan fits the topology
    report = json.loads(capsys.readouterr().out)
    assert report["world_size"] == 4 and report["world_size_from"] == "WORLD_SIZE"
    assert report["deepspeed"]["moe"]["ep_size"] == 4 and report["model_checked"] is False
    line = _cli_fails(capsys, ["check-config", str(path), "--model", str(mixtral)])
    # the line names the plan file and the checkpoint folder
    assert line == f"error: plan {tmp_path / 'plan.json'} has 3 MoE layers but the checkpoint {mixtral} has 2"
    _plan(Topology(2, 2)).save(tmp_path / "plan.json")
    assert cli_main(["check-config", str(path), "--model", str(mixtral)]) == 0
    assert json.loads(capsys.readouterr().out)["model_checked"] is True


def test_check_config_takes_the_topology_as_generate_does(mixtral, tmp_path, capsys, monkeypatch):
    """The README's example: a config with "auto" topology, the journey's 2 x 2 plan, no launcher."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_SIZE", "CROSS_SIZE"):
        monkeypatch.delenv(name, raising=False)
    _plan(Topology(2, 2)).save(tmp_path / "plan.json")
    config = str(REPO_ROOT / "ds_configs" / "grace.json")
    plan = str(tmp_path / "plan.json")
    line = _cli_fails(capsys, ["check-config", config, "--world-size", "4", "--plan", plan])
    assert line.startswith(f"error: plan {plan} topology (2 nodes x 2 GPUs) does not match")
    args = [
        "check-config",
        config,
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--plan",
        plan,
        "--model",
        str(mixtral),
    ]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["grace"]["topology"] == {"num_nodes": 2, "gpus_per_node": 2}
    assert report["world_size"] == 4 and report["world_size_from"] == "grace.topology"
    assert report["model_checked"] is True
    line = _cli_fails(capsys, ["check-config", config, "--nodes", "0"])
    assert "--nodes" in line and "must be an integer >= 1" in line


# ---- dependency ranges ----


def _requirements() -> dict[str, str]:
    import ast

    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    call = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    values = {
        kw.arg: ast.literal_eval(kw.value)
        for kw in call.keywords
        if kw.arg in ("install_requires", "extras_require")
    }
    from packaging.requirements import Requirement

    reqs = [Requirement(text) for text in values["install_requires"] + values["extras_require"]["test"]]
    return {req.name: req for req in reqs}


def test_setup_ranges_admit_only_what_the_code_supports():
    from importlib.metadata import version

    from packaging.version import Version

    requirements = _requirements()
    # the adapters refuse the transformers 4.x expert layout and 5.0's router-logit recording
    for refused in ("4.48.0", "4.57.1", "5.0.0"):
        assert not requirements["transformers"].specifier.contains(refused), refused
    assert not requirements["transformers"].specifier.contains("6.0.0")
    # the versions this suite runs with are inside every range
    for name, requirement in requirements.items():
        installed = Version(version(name))
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{name} {installed} vs {requirement}"
        )
