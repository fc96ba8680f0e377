"""Routing profiles in one process: the observers agree, padding is skipped, the model is left as found,
`ds-grace profile` writes a trace `ds-grace plan` turns into a servable plan, the byte-level tokenizer fallback, and DeepSpeed's
capacity rule in the vanilla gate (against DeepSpeed's own gates).

Shape legend: S tokens, E experts, K top-k.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deepspeed.moe.sharded_moe import top2gating, topkgating
from integration_cases import calibration_batches

from ds_grace.cli import main as cli_main
from ds_grace.config import parse_grace_block
from ds_grace.inference import describe_moe, resolve_plan
from ds_grace.models import convert_moe_blocks, load_checkpoint, tiny_checkpoint
from ds_grace.profiling import ByteTokenizer, load_text_tokenizer, profile_routing, token_batches
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace, TraceError, load_trace
from ds_grace.vanilla_hf import deepspeed_capacity_routes


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    return tiny_checkpoint("deepseek_v3", tmp_path_factory.mktemp("profile") / "deepseek_v3", seed=4)


def _padded_batches() -> list[dict]:
    batches = calibration_batches(3, batches=3, rows=3, length=12)
    for batch in batches:
        batch["attention_mask"][1, :5] = 0  # a left-padded row
        batch["input_ids"][1, :5] = 0
    return batches


def test_hook_and_callback_observers_agree_and_skip_padding(deepseek_v3):
    batches = _padded_batches()
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    plain = load_checkpoint(deepseek_v3)
    converted = load_checkpoint(deepseek_v3)
    blocks = convert_moe_blocks(converted)
    by_hook = profile_routing(plain, batches, tokens=10_000, progress=False)
    by_callback = profile_routing(converted, batches, tokens=10_000, progress=False)
    assert (
        by_hook.num_tokens == (real_tokens, real_tokens) and by_hook.top_k == 2 and by_hook.num_experts == 8
    )
    for layer in range(2):
        np.testing.assert_array_equal(by_hook.topk_ids[layer], by_callback.topk_ids[layer])
        np.testing.assert_array_equal(by_hook.gate_weights[layer], by_callback.gate_weights[layer])
        np.testing.assert_array_equal(by_hook.token_ids[layer], np.arange(real_tokens))
    # the model is left as it was found
    assert all(block.routing_callback is None for block in blocks)
    assert not any(module._forward_pre_hooks for module in plain.modules())


def test_profile_stops_at_the_requested_token_count(deepseek_v3):
    model = load_checkpoint(deepseek_v3)
    trace = profile_routing(
        model, calibration_batches(3, batches=5, rows=2, length=16), tokens=40, progress=False
    )
    full = profile_routing(
        model, calibration_batches(3, batches=5, rows=2, length=16), tokens=64, progress=False
    )
    assert trace.num_tokens == (40, 40) and trace.metadata["tokens"] == 40
    np.testing.assert_array_equal(trace.topk_ids[1], full.topk_ids[1][:40])
    with pytest.raises(ValueError, match=r"tokens \(0\) must be an integer >= 1"):
        profile_routing(model, [], tokens=0)
    with pytest.raises(TraceError, match="no token was recorded"):
        profile_routing(model, [], tokens=5, progress=False)
    with pytest.raises(TraceError, match="holds no MoE layer"):
        profile_routing(torch.nn.Linear(2, 2), [], tokens=5)


def test_cli_profile_writes_a_trace_the_planner_accepts(deepseek_v3, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("GRACE groups experts that tokens choose together, then replicates the hot ones. " * 4)
    out = tmp_path / "trace.npz"
    argv = ["profile", "--model", str(deepseek_v3), "--data", str(text), "--tokens", "200"]
    rc = cli_main(
        [*argv, "--out", str(out), "--seq-len", "64", "--batch-size", "2", "--no-progress", "--json"]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    assert summary == {
        "out": str(out), "family": "deepseek_v3", "tokens": 200, "requested_tokens": 200, "layers": 2,
        "experts": 8, "top_k": 2, "tokenizer": "byte-fallback", "ranks": 1,
    }  # fmt: skip
    trace = load_trace(out)
    assert isinstance(trace, RoutingTrace) and trace.num_tokens == (200, 200)
    assert trace.metadata["family"] == "deepseek_v3" and trace.metadata["tokenizer"] == "byte-fallback"
    # the trace feeds `ds-grace plan`, whose plan passes init_inference's checks for this model and cluster
    plan_path = tmp_path / "plan.json"
    plan_argv = ["plan", "--trace", str(out), "--nodes", "2", "--gpus-per-node", "2", "--out", str(plan_path)]
    assert cli_main(plan_argv) == 0
    capsys.readouterr()
    grace = parse_grace_block({"plan": {"path": str(plan_path)}})
    plan = resolve_plan(grace, topology=Topology(2, 2), moe=describe_moe(load_checkpoint(deepseek_v3)))
    assert plan.num_layers == 2 and plan.num_experts == 8 and plan.trace_fingerprint == trace.fingerprint
    assert (
        cli_main(
            ["profile", "--model", str(tmp_path / "none"), "--data", str(text), "--tokens", "5", "--out", "x"]
        )
        == 2
    )
    assert "checkpoint folder" in capsys.readouterr().err


def test_byte_tokenizer_fallback(deepseek_v3):
    tokenizer = load_text_tokenizer(deepseek_v3)
    assert tokenizer == ByteTokenizer(vocab_size=128, reserved=3)  # pad/bos/eos are ids 0..2
    ids = tokenizer.encode("Aé")
    assert ids == [3 + 65, 3 + 0xC3 % 125, 3 + 0xA9 % 125]
    assert tokenizer.decode(ids) is None  # 125 ids cannot hold 256 bytes
    wide = ByteTokenizer(vocab_size=300, reserved=3)
    assert wide.decode(wide.encode("GRACE é")) == "GRACE é"
    with pytest.raises(ValueError, match=r"reserved ids \(5\) must be in \[0, vocab_size=5\)"):
        ByteTokenizer(vocab_size=5, reserved=5)


def test_token_batches_deal_sequences_to_ranks():
    stream = list(range(10, 33))  # 23 tokens: sequences of 8, 8, 7
    rank0 = list(token_batches(stream, seq_len=8, batch_size=4, rank=0, world_size=2))
    rank1 = list(token_batches(stream, seq_len=8, batch_size=4, rank=1, world_size=2))
    assert len(rank0) == 1 and rank0[0]["input_ids"].tolist() == [
        list(range(10, 18)),
        [0] + list(range(26, 33)),
    ]
    assert rank0[0]["attention_mask"].tolist() == [[1] * 8, [0] + [1] * 7]
    assert rank1[0]["input_ids"].tolist() == [list(range(18, 26))] and rank0[0]["use_cache"] is False


def _deepspeed_routing(logits_SE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids DeepSpeed's gate picks (top-2: first, then second choice) and the softmax weights."""
    probs_SE = torch.softmax(logits_SE, dim=1)
    weights_SK, ids_SK = torch.topk(probs_SE, k=k, dim=1)
    return ids_SK, weights_SK


@pytest.mark.parametrize("k", [2, 4])
def test_capacity_rule_matches_deepspeed_gates(k):
    generator = torch.Generator().manual_seed(k)
    logits_SE = torch.randn(40, 8, generator=generator) * 2 + torch.linspace(0, 3, 8)  # skewed: overflow
    ids_SK, weights_SK = _deepspeed_routing(logits_SE, k)
    capacity, indices_KS, locations_KS, gates_KS, counts_E = deepspeed_capacity_routes(
        ids_SK, weights_SK, num_experts=8, capacity_factor=1.0, min_capacity=2, drop_tokens=True
    )
    if k == 2:
        expected = top2gating(logits_SE.clone(), 1.0, 2, True, None, False, sparse_routes=True)
    else:
        expected = topkgating(logits_SE.clone(), k, 1.0, 2, True, None, sparse_routes=True)
    _, ds_capacity, _, ds_indices_KS, ds_locations_KS, _, ds_counts_E = expected
    assert int(capacity) == int(ds_capacity)
    assert torch.equal(counts_E, ds_counts_E)
    assert (indices_KS == -1).any()  # the skew overflows some experts
    kept_KS = indices_KS >= 0
    if k == 2:  # same route order as DeepSpeed's sparse output
        assert torch.equal(indices_KS, ds_indices_KS)
        assert torch.equal(locations_KS[kept_KS], ds_locations_KS[kept_KS])
    else:  # DeepSpeed's topkgating orders routes by probability too: compare (token, expert, slot) sets
        ours = {(s, int(indices_KS[j, s]), int(locations_KS[j, s])) for j, s in kept_KS.nonzero().tolist()}
        ds_kept = ds_indices_KS >= 0
        theirs = {
            (s, int(ds_indices_KS[j, s]), int(ds_locations_KS[j, s])) for j, s in ds_kept.nonzero().tolist()
        }
        assert ours == theirs
    # kept routes keep the model's weights; dropped ones weigh nothing
    assert torch.equal(gates_KS[kept_KS], weights_SK.t()[kept_KS]) and not gates_KS[~kept_KS].any()


def test_capacity_rule_lossless_keeps_every_route():
    ids_SK = torch.tensor([[0, 1], [0, 2], [0, 1]])
    capacity, indices_KS, locations_KS, gates_KS, counts_E = deepspeed_capacity_routes(
        ids_SK, torch.full((3, 2), 0.5), num_experts=4, capacity_factor=1.0, min_capacity=0, drop_tokens=False
    )
    assert int(capacity) == 3 and torch.equal(indices_KS, ids_SK.t().int())
    assert locations_KS.tolist() == [[0, 1, 2], [0, 0, 1]] and counts_E.tolist() == [3, 2, 1, 0]
