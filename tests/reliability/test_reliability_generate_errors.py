"""launch/generate.py, check-config and profile refuse bad input with one `error:` line and exit code 2,
never a traceback: damaged safetensors files are named, and so are generate.py's own arguments. Under a
launcher of several ranks each rank's line carries its rank and host."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch.distributed as dist

from ds_grace.cli import main as cli_main
from ds_grace.models import tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE = REPO_ROOT / "launch" / "generate.py"
SIZES = {"half": None, "20 bytes": 20, "empty": 0}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("errors") / "qwen3_moe", seed=5)


@pytest.fixture
def generate(monkeypatch):
    """launch/generate.py as a module, run with no launcher (a world of one process)."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_SIZE"):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("ds_grace_launch_generate_errors", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    assert not dist.is_initialized()


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    lines = [line for line in captured.err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def _damaged(model: Path, tmp_path: Path, size: int | None) -> tuple[Path, Path]:
    copy = tmp_path / "damaged"
    shutil.copytree(model, copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 if size is None else size])
    return copy, weights


def _vanilla_config(tmp_path: Path) -> Path:
    path = tmp_path / "vanilla.json"
    path.write_text(json.dumps({"dtype": "fp32", "grace": {"enabled": False}}))
    return path


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_a_damaged_safetensors_file_is_named_everywhere(model, tmp_path, size, capsys, generate):
    damaged, weights = _damaged(model, tmp_path, size)
    expected = (
        f"error: checkpoint file ({weights}, {weights.stat().st_size} bytes) is not a whole safetensors file"
    )
    config = _vanilla_config(tmp_path)
    argv = ["--model", str(damaged), "--ds-config", str(config), "--prompt", "a", "--warmup", "0"]
    assert generate.run(argv) == 2
    assert _one_error_line(capsys).startswith(expected)
    assert cli_main(["check-config", str(config), "--model", str(damaged)]) == 2
    assert _one_error_line(capsys).startswith(expected)
    data = tmp_path / "data.txt"
    data.write_text("some calibration text " * 20)
    argv = [
        "profile",
        "--model",
        str(damaged),
        "--data",
        str(data),
        "--tokens",
        "32",
        "--out",
        str(tmp_path / "t.npz"),
    ]
    assert cli_main([*argv, "--no-progress"]) == 2
    assert expected.removeprefix("error: ") in _one_error_line(capsys)


def _cases(model: Path, tmp: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    vanilla = _vanilla_config(tmp)
    malformed = tmp / "malformed.json"
    malformed.write_text('{"dtype": "fp32",')
    broken = tmp / "broken-model"
    shutil.copytree(model, broken)
    (broken / "config.json").write_text("{not json")
    base = ["--ds-config", str(vanilla), "--prompt", "a", "--warmup", "0"]
    return {
        "malformed ds-config": (
            ["--model", str(model), "--ds-config", str(malformed), "--prompt", "a"],
            {},
            f"error: ds_config file ({malformed}) is not valid JSON: ",
        ),
        "plan with vanilla": (
            ["--model", str(model), *base, "--plan", "p.json"],
            {},
            f"error: --plan (p.json) needs a ds_config with an enabled grace block; {vanilla} serves vanilla",
        ),
        "nodes from env": (
            ["--model", str(model), *base],
            {"DS_GRACE_NUM_NODES": "two"},
            "error: environment variable DS_GRACE_NUM_NODES ('two') must be a positive integer",
        ),
        "missing model": (
            ["--model", str(tmp / "nope"), *base],
            {},
            f"error: checkpoint folder ({tmp / 'nope'}) does not exist",
        ),
        "broken config.json": (
            ["--model", str(broken), *base],
            {},
            f"error: checkpoint config ({broken / 'config.json'}) is not a JSON object",
        ),
        "usage": (["--model", str(model)], {}, "error: generate.py: the following arguments are required"),
    }


CASE_NAMES = [
    "malformed ds-config",
    "plan with vanilla",
    "nodes from env",
    "missing model",
    "broken config.json",
    "usage",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_generate_input_errors_are_one_line_and_exit_code_2(
    name, model, tmp_path, capsys, generate, monkeypatch
):
    argv, env, expected = _cases(model, tmp_path)[name]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert generate.run(argv) == 2
    assert _one_error_line(capsys).startswith(expected)


def test_a_prompt_that_encodes_to_no_token_is_refused(model, tmp_path, capsys, generate, monkeypatch):
    import ds_grace.profiling

    real = ds_grace.profiling.load_text_tokenizer

    class NoTokensForBlanks:  # as a subword tokenizer that drops whitespace
        def __init__(self, folder):
            self.tokenizer = real(folder)

        def encode(self, text):
            return self.tokenizer.encode(text) if text.strip() else []

    def no_tokens_for_blanks(folder):
        return NoTokensForBlanks(folder)

    monkeypatch.setattr(ds_grace.profiling, "load_text_tokenizer", no_tokens_for_blanks)
    argv = [
        "--model",
        str(model),
        "--ds-config",
        str(_vanilla_config(tmp_path)),
        "--prompt",
        "a",
        "--prompt",
        " ",
    ]
    assert generate.run(argv) == 2
    assert _one_error_line(capsys) == "error: --prompt (' ') encodes to no token: give it some text"


def test_under_a_launcher_each_rank_names_itself(model, tmp_path, capsys, generate, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert generate.run(["--model", str(tmp_path / "nope"), "--ds-config", "c.json", "--prompt", "a"]) == 2
    line = _one_error_line(capsys)
    assert (
        line
        == f"error: rank 1 (host {socket.gethostname()}): checkpoint folder ({tmp_path / 'nope'}) does not exist"
    )
