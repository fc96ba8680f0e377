"""launch/generate.py through the real `deepspeed` launcher: a hostfile of two nodes with one rank each,
--no_ssh, one launcher per node (as on a cluster without ssh), GRACE planned at start-up from a trace,
then (--compare-vanilla) vanilla DeepSpeed-MoE in the same launch. Both continuations must equal
single-process transformers generate (each cut after its first EOS). Without any launcher,
init_inference serves in a world of one process.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from integration_cases import calibration_batches

import ds_grace
from ds_grace.cluster.node_launchers import run_node_launchers
from ds_grace.models import load_checkpoint, tiny_checkpoint
from ds_grace.profiling import load_text_tokenizer, profile_routing

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE = REPO_ROOT / "launch" / "generate.py"
PROMPTS = ("GRACE moves experts", "MoE", "two nodes, one rank each")
NEW_TOKENS = 5
EOS_ID = 2
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    path = tiny_checkpoint("qwen3_moe", root / "qwen3_moe", seed=7)
    trace = profile_routing(
        load_checkpoint(path),
        calibration_batches(5, batches=2, rows=4, length=32),
        tokens=256,
        progress=False,
    )
    trace.save(root / "trace.npz")
    return root, path


def _prompt_args() -> list[str]:
    return [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]


@functools.cache
def _reference(path: Path) -> list[list[int]]:
    """Single-process transformers greedy generate of PROMPTS, each continuation cut after its EOS."""
    tokenizer = load_text_tokenizer(path)
    prompt_ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.zeros(len(prompt_ids), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    model = load_checkpoint(path)
    with torch.no_grad():
        tokens = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    continuations = []
    for row in tokens[:, width:].tolist():
        cut = row[: row.index(EOS_ID) + 1] if EOS_ID in row else row
        continuations.append(cut)
    return continuations


def _two_nodes(script: list[str], tmp_path: Path):
    """`script` on two nodes of one rank each, one launcher per node (--no_ssh)."""
    return run_node_launchers(
        node_scripts=[script, script],
        ranks_per_node=1,
        workdir=tmp_path,
        timeout_s=LAUNCH_TIMEOUT_S,
        env={"PYTHONUNBUFFERED": "1"},
    )


def _report(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON report in:\n{stdout}"
    return json.loads(lines[-1])


def test_generate_through_deepspeed_launcher_two_nodes_no_ssh(checkpoint, tmp_path):
    root, path = checkpoint
    config = tmp_path / "grace.json"
    config.write_text(
        json.dumps(
            {
                "dtype": "fp32",
                "grace": {"profile": {"trace": str(root / "trace.npz")}, "communication": {"timeout_s": 60}},
            }
        )
    )
    script = [str(GENERATE), "--model", str(path), "--ds-config", str(config), *_prompt_args()]
    script += ["--max-new-tokens", str(NEW_TOKENS), "--warmup", "0", "--compare-vanilla", "--json"]
    run = _two_nodes(script, tmp_path)
    outputs = run.outputs
    assert run.exit_codes == [0, 0], run.shown(tail_chars=4000)
    report = _report(outputs[0])
    assert report["mode"] == "grace" and report["family"] == "qwen3_moe"
    assert report["world_size"] == 2 and report["topology"] == {"num_nodes": 2, "gpus_per_node": 1}
    assert [result["new_token_ids"] for result in report["results"]] == _reference(path)
    assert report["prefill_ms"] > 0 and report["decode_ms_per_token"] > 0
    assert report["moe_stats"]["rows_sent_inter"] > 0  # tokens crossed between the two nodes
    assert not [line for line in outputs[1].splitlines() if line.startswith('{"mode"')]  # rank 0 reports
    vanilla = report["vanilla"]  # the same launch, served again without the grace block
    assert vanilla["mode"] == "vanilla" and report["same_tokens"] is True
    assert [result["new_token_ids"] for result in vanilla["results"]] == _reference(path)
    assert vanilla["moe_stats"]["dropped_routes"] == 0 and vanilla["moe_stats"]["routes"] > 0
    assert report["speedup"]["prefill"]["median"] > 0 and report["speedup"]["decode"]["median"] > 0
    assert report["repeats"] == 3 and len(report["prefill_ms_runs"]["samples"]) == 3


def test_single_process_without_launcher(checkpoint, monkeypatch):
    """No launcher, no process group: init_inference starts a world of one rank (and this test ends it)."""
    from ds_grace.comm.groups import clear_group_cache

    _, path = checkpoint
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    try:
        engine = ds_grace.init_inference(str(path), config={"dtype": "fp32", "grace": {"enabled": False}})
        assert dist.get_world_size() == 1 and engine.grace.mode == "vanilla"
        tokenizer = load_text_tokenizer(path)
        input_ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
        with torch.no_grad():
            tokens = engine.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        continuation = tokens[0, input_ids.shape[1] :].tolist()
        assert continuation[: len(_reference(path)[0])] == _reference(path)[0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        clear_group_cache()


def _generate_module():
    spec = importlib.util.spec_from_file_location("ds_grace_launch_generate", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_helpers(tmp_path, monkeypatch):
    generate = _generate_module()
    assert [generate.deal_prompts(3, world_size=4, rank=r) for r in range(4)] == [[0], [1], [2], [None]]
    assert [generate.deal_prompts(5, world_size=2, rank=r) for r in range(2)] == [[0, 1, 2], [3, 4, None]]
    input_ids, mask = generate.left_pad([[5, 6], [7]], width=3, pad_id=0)
    assert input_ids.tolist() == [[0, 5, 6], [0, 0, 7]] and mask.tolist() == [[0, 1, 1], [0, 0, 1]]
    assert generate.cut_at_eos([4, 2, 9], [2]) == [4, 2] and generate.cut_at_eos([4, 9], [2]) == [4, 9]
    config_path = tmp_path / "grace.json"
    config_path.write_text(json.dumps({"dtype": "fp32", "grace": {"topology": {"num_nodes": "auto"}}}))
    monkeypatch.setenv("DS_GRACE_NUM_NODES", "2")
    monkeypatch.setenv("DS_GRACE_GPUS_PER_NODE", "2")
    config = generate.load_config(str(config_path), nodes=None, gpus_per_node=None, plan="p.json")
    assert config["grace"] == {"topology": {"num_nodes": 2, "gpus_per_node": 2}, "plan": {"path": "p.json"}}
    assert generate.load_config(str(config_path), nodes=4, gpus_per_node=1)["grace"]["topology"] == {
        "num_nodes": 4,
        "gpus_per_node": 1,
    }
    assert generate.vanilla_config(config)["grace"] == {"enabled": False, "vanilla": {}}
    config_path.write_text(json.dumps({"dtype": "fp32"}))
    with pytest.raises(ValueError, match=r"--plan \(p.json\) needs a ds_config with an enabled grace block"):
        generate.load_config(str(config_path), nodes=None, gpus_per_node=None, plan="p.json")


def test_engine_generate_keeps_every_rank_stepping_until_all_are_done(checkpoint, tmp_path):
    """README's engine.generate through the launcher (two nodes, one rank each), GRACE then vanilla: rank 0
    reaches its end-of-sequence at the first new token, rank 1 generates 6; both equal the reference."""
    root, path = checkpoint
    script = [str(Path(__file__).with_name("uneven_generate_rank.py")), str(path), str(root / "trace.npz")]
    run = _two_nodes(script, tmp_path)
    assert run.exit_codes == [0, 0], run.shown(tail_chars=4000)
    for rank, output in enumerate(run.outputs):
        report = _report(output)
        assert report["rank"] == rank and report["grace_world"] == report["vanilla_world"] == 2
        assert len(report["reference"]) == (1 if rank == 0 else 6)  # rank 0 stops 5 steps before rank 1
        assert report["grace"] == report["reference"], run.shown(tail_chars=4000)
        assert report["vanilla"] == report["reference"], run.shown(tail_chars=4000)
