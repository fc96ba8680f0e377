"""Vanilla DeepSpeed-MoE baseline: toy model, serving with wired groups, dropped-route counting.

Shape legend: T tokens, S tokens a gate sees (T plus padding), D hidden, E experts.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from ds_grace.cli import main as cli_main
from ds_grace.comm.deepspeed_groups import (
    ExpertGroupError,
    expert_parallel_group_ranks,
    expert_parallel_layout,
    expert_parallel_rank,
)
from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.commands.baseline import parse_tokens, uneven_token_split
from ds_grace.config import GraceConfigError, VanillaConfig
from ds_grace.models.toy import ToyMoEConfig, ToyMoEModel, toy_batch
from ds_grace.topology import Topology
from ds_grace.vanilla import (
    DEEPSPEED_DEFAULT,
    LOSSLESS,
    DroppedRouteCounter,
    ToyRunSpec,
    configure_vanilla_gates,
    gate_stats,
    reference_forward,
    run_toy_modes_on_rank,
    serve_vanilla,
    summarize_toy_run,
    toy_global_batch,
    vanilla_forward,
)

FP32_ATOL = 1e-5


# ---- an independent statement of DeepSpeed's capacity rule (not using ds_grace) ----


def expected_capacity(num_tokens: int, num_experts: int, k: int, vanilla: VanillaConfig) -> int:
    return max(math.ceil(num_tokens * vanilla.eval_capacity_factor * k / num_experts), vanilla.min_capacity)


def expected_dropped(
    x_SD: torch.Tensor,
    gate_weight_ED: torch.Tensor,
    *,
    k: int,
    vanilla: VanillaConfig,
    used_S: torch.Tensor | None,
) -> tuple[int, int]:
    """(capacity, dropped routes of real tokens) under drop_tokens=True.

    top-1: an expert keeps at most `capacity` of the (real) tokens that chose it.
    top-2: slots go in order to every token's first choice (token order, padding included, since
    DeepSpeed's top-2 gate ignores used_token), then to every second choice.
    """
    logits_SE = x_SD.float() @ gate_weight_ED.float().t()
    num_tokens, num_experts = logits_SE.shape
    real_S = torch.ones(num_tokens, dtype=torch.bool) if used_S is None else used_S.bool()
    capacity = expected_capacity(num_tokens, num_experts, k, vanilla)
    first_S = logits_SE.argmax(dim=1)
    if k == 1:
        load_E = torch.bincount(first_S[real_S], minlength=num_experts)
        return capacity, int((load_E - capacity).clamp(min=0).sum())
    second_S = logits_SE.scatter(1, first_S[:, None], float("-inf")).argmax(dim=1)
    slots_taken = [0] * num_experts
    kept_S = {0: [False] * num_tokens, 1: [False] * num_tokens}
    for choice, experts_S in enumerate((first_S.tolist(), second_S.tolist())):
        for token, expert in enumerate(experts_S):
            kept_S[choice][token] = slots_taken[expert] < capacity
            slots_taken[expert] += 1
    dropped = sum(
        1 for choice in (0, 1) for token in range(num_tokens) if real_S[token] and not kept_S[choice][token]
    )
    return capacity, dropped


# ---- single process ----


def test_toy_config_errors_name_field_value_and_rule():
    with pytest.raises(ValueError, match=r"ToyMoEConfig.k \(3\) must be 1 or 2"):
        ToyMoEConfig(k=3)
    with pytest.raises(
        ValueError, match=r"ToyMoEConfig.num_experts \(6\) must be divisible by ep_size \(4\)"
    ):
        ToyMoEConfig(num_experts=6, ep_size=4)
    with pytest.raises(ValueError, match=r"ToyMoEConfig.num_layers \(0\) must be an integer >= 1"):
        ToyMoEConfig(num_layers=0)
    with pytest.raises(ValueError, match=r"ep_rank \(4\) must be in \[0, ep_size=4\)"):
        ToyMoEModel(ToyMoEConfig(ep_size=4), ep_rank=4)


def test_toy_model_is_deterministic_and_shards_hold_the_reference_experts():
    config = ToyMoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=8, num_layers=2, ep_size=4, seed=3)
    reference = ToyMoEModel(replace(config, ep_size=1)).state_dict()
    again = ToyMoEModel(replace(config, ep_size=1)).state_dict()
    assert all(torch.equal(reference[name], again[name]) for name in reference)
    other_seed = ToyMoEModel(replace(config, ep_size=1, seed=4)).state_dict()
    assert not torch.equal(reference["blocks.0.dense.weight"], other_seed["blocks.0.dense.weight"])

    expert_prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
    for ep_rank in range(4):
        shard = ToyMoEModel(config, ep_rank=ep_rank)
        assert shard.local_expert_ids == [2 * ep_rank, 2 * ep_rank + 1]
        for name, tensor in shard.state_dict().items():
            if expert_prefix in name:
                head, tail = name.split(expert_prefix)
                slot, rest = tail.split(".", 1)
                global_name = f"{head}{expert_prefix}{shard.local_expert_ids[int(slot)]}.{rest}"
                assert torch.equal(tensor, reference[global_name]), name
            else:
                assert torch.equal(tensor, reference[name]), name
    experts = ToyMoEModel(replace(config, ep_size=1)).blocks[0].moe.deepspeed_moe.experts.deepspeed_experts
    assert not torch.equal(experts[0][0].weight, experts[1][0].weight)


@pytest.mark.parametrize("k", [1, 2])
def test_counter_matches_independent_capacity_rule_in_one_process(k):
    config = ToyMoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, k=k, num_layers=2, seed=1)
    model = ToyMoEModel(config)
    configure_vanilla_gates(model, DEEPSPEED_DEFAULT)
    model.eval()
    counter = DroppedRouteCounter(model, record_gate_inputs=True)
    x_TD = toy_batch(40, 16, seed=5, skew=0.7)
    vanilla_forward(model, x_TD, pad_to=48)
    total_dropped = 0
    for layer in range(config.num_layers):
        stats = counter.stats[layer][-1]
        x_SD, used_S = counter.gate_inputs[layer][-1]
        assert x_SD.shape == (48, 16) and int(used_S.sum()) == 40
        gate_weight = model.blocks[layer].moe.deepspeed_moe.gate.wg.weight
        capacity, dropped = expected_dropped(x_SD, gate_weight, k=k, vanilla=DEEPSPEED_DEFAULT, used_S=used_S)
        assert (stats.routes, stats.dropped, stats.capacity) == (k * 40, dropped, capacity)
        total_dropped += dropped
    assert total_dropped > 0


def test_dense_and_sparse_gate_outputs_count_the_same():
    config = ToyMoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, k=2, num_layers=1, seed=2)
    model = ToyMoEModel(config)
    configure_vanilla_gates(model, DEEPSPEED_DEFAULT)
    gate = model.blocks[0].moe.deepspeed_moe.gate.eval()
    x_SD = toy_batch(32, 16, seed=1, skew=0.8)
    with torch.no_grad():
        sparse = gate_stats(2, gate(x_SD, None, True), None)
        dense = gate_stats(2, gate(x_SD, None, False), None)
    assert sparse == dense
    assert sparse.dropped > 0
    assert (
        sparse.dropped
        == expected_dropped(x_SD, gate.wg.weight, k=2, vanilla=DEEPSPEED_DEFAULT, used_S=None)[1]
    )


def test_padding_is_invisible_in_top1_outputs():
    config = ToyMoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, k=1, num_layers=2, seed=0)
    model = ToyMoEModel(config)
    configure_vanilla_gates(model, LOSSLESS)
    model.eval()
    x_TD = toy_batch(20, 16, seed=2)
    unpadded_TD = vanilla_forward(model, x_TD, pad_to=20)
    padded_TD = vanilla_forward(model, x_TD, pad_to=32)
    assert padded_TD.shape == (20, 16)
    torch.testing.assert_close(padded_TD, unpadded_TD, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(unpadded_TD, reference_forward(config, x_TD), atol=FP32_ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"pad_to \(10\) must be >= this rank's token count \(20\)"):
        vanilla_forward(model, x_TD, pad_to=10)


def test_serve_vanilla_refuses_bad_configs_before_touching_deepspeed():
    model = ToyMoEModel(ToyMoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, ep_size=2))
    with pytest.raises(GraceConfigError, match=r'holds a "grace" block.*load_ds_config'):
        serve_vanilla(model, {"dtype": "fp32", "grace": {"enabled": False}}, LOSSLESS)
    with pytest.raises(
        ExpertGroupError, match=r"moe.ep_size \(4\) must equal the ep_size of the model's MoE layers \(2\)"
    ):
        serve_vanilla(model, {"dtype": "fp32", "moe": {"ep_size": 4}}, LOSSLESS)
    with pytest.raises(GraceConfigError, match=r"dtype \('fp16'\) must be fp32 or bf16 on CPU"):
        serve_vanilla(model, {"dtype": "fp16"}, LOSSLESS)
    with pytest.raises(
        GraceConfigError, match=r"dtype \(unset, DeepSpeed's default fp16\) must be fp32 or bf16"
    ):
        serve_vanilla(model, {}, LOSSLESS)
    with pytest.raises(RuntimeError, match=r"needs torch.distributed initialised"):
        serve_vanilla(model, {"dtype": "fp32"}, LOSSLESS)


def test_expert_parallel_layout_is_contiguous_blocks():
    assert expert_parallel_layout(4, 4) == [[0, 1, 2, 3]]
    assert expert_parallel_layout(4, 2) == [[0, 1], [2, 3]]
    assert expert_parallel_layout(4, 1) == [[0], [1], [2], [3]]
    assert [expert_parallel_rank(r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert expert_parallel_group_ranks(3, 2) == [2, 3]
    with pytest.raises(
        ExpertGroupError, match=r"moe.ep_size \(3\) must be >= 1 and divide the world size \(4\)"
    ):
        expert_parallel_layout(4, 3)


def test_token_splits():
    assert uneven_token_split(256, 4) == [90, 73, 55, 38]
    assert sum(uneven_token_split(101, 3)) == 101
    assert uneven_token_split(7, 1) == [7]
    assert parse_tokens("10,20,30,40", 4) == [10, 20, 30, 40]
    assert parse_tokens(None, 2) == [90, 38]
    with pytest.raises(ValueError, match=r"--tokens \('1,2'\) must list one count >= 1 per rank \(4 ranks\)"):
        parse_tokens("1,2", 4)
    with pytest.raises(ValueError, match=r"--tokens \(3\) must be at least the world size \(4\)"):
        parse_tokens("3", 4)


# ---- on 4 gloo ranks ----

TOKENS_PER_RANK = (44, 30, 37, 25)


def _specs() -> list[ToyRunSpec]:
    return [
        ToyRunSpec(
            model=ToyMoEConfig(
                hidden_size=32, ffn_hidden_size=48, num_experts=8, k=k, num_layers=2, ep_size=ep_size, seed=11
            ),
            tokens_per_rank=TOKENS_PER_RANK,
            modes=(("deepspeed-default", DEEPSPEED_DEFAULT), ("lossless", LOSSLESS)),
            batch_seed=7,
            skew=0.6,
            warmup=0,
            iters=1,
            record_gate_inputs=True,
        )
        for ep_size in (4, 2)
        for k in (2, 1)
    ]


def _run_specs(ctx: RankContext, specs: list[ToyRunSpec]) -> tuple[list[list], str]:
    results = [run_toy_modes_on_rank(ctx, spec) for spec in specs]
    # a shard built for another ep rank is refused on every rank, before any collective
    wrong_shard = ToyMoEModel(specs[0].model, ep_rank=(ctx.rank + 1) % specs[0].model.ep_size)
    try:
        serve_vanilla(wrong_shard, {"dtype": "fp32"}, LOSSLESS)
    except ExpertGroupError as exc:
        return results, str(exc)
    return results, "no error"


@pytest.mark.multirank
def test_vanilla_on_four_ranks_is_lossless_or_counts_its_drops():
    """ep_size 4 and 2 (two expert-parallel groups), top-2 and top-1, both modes: one spawn."""
    specs = _specs()
    returned = run_on_ranks(
        _run_specs, topology=Topology(num_nodes=1, gpus_per_node=4), args=(specs,), timeout_s=240
    )
    per_rank = [results for results, _ in returned]
    wrong_shard_errors = [message for _, message in returned]
    assert wrong_shard_errors[2] == (
        "model.ep_rank (3) must be rank 2's position in its expert-parallel group (2, ranks [0, 1, 2, 3]): "
        "the model holds another rank's experts"
    )
    assert all(message.startswith("model.ep_rank (") for message in wrong_shard_errors)
    for spec_index, spec in enumerate(specs):
        k, ep_size = spec.model.k, spec.model.ep_size
        case = f"k={k} ep_size={ep_size}"
        rank_results = [rank_specs[spec_index] for rank_specs in per_rank]
        reference_model = ToyMoEModel(replace(spec.model, ep_size=1))
        reference_TD = reference_forward(spec.model, toy_global_batch(spec))
        default, lossless = summarize_toy_run(spec, rank_results, reference_TD)

        # lossless equals the single-process reference, and nothing is dropped
        assert lossless.max_abs_diff <= FP32_ATOL, (case, lossless)
        assert lossless.dropped == 0 and lossless.routes == k * sum(TOKENS_PER_RANK) * spec.model.num_layers

        # default mode: every rank's count per layer equals the independent capacity rule
        group_max = [
            max(TOKENS_PER_RANK[r] for r in expert_parallel_group_ranks(rank, ep_size)) for rank in range(4)
        ]
        for rank, results in enumerate(rank_results):
            result = results[0]
            assert result.mode == "deepspeed-default"
            assert result.padded_tokens == group_max[rank] - TOKENS_PER_RANK[rank], (case, rank)
            for layer, stats in enumerate(result.gate_stats):
                x_SD, used_S = result.gate_inputs[layer]
                assert x_SD.shape[0] == group_max[rank]
                gate_weight = reference_model.blocks[layer].moe.deepspeed_moe.gate.wg.weight
                capacity, dropped = expected_dropped(
                    x_SD, gate_weight, k=k, vanilla=DEEPSPEED_DEFAULT, used_S=used_S
                )
                assert (stats.routes, stats.dropped, stats.capacity) == (
                    k * TOKENS_PER_RANK[rank],
                    dropped,
                    capacity,
                ), (case, rank, layer)
        assert default.routes == lossless.routes
        assert default.dropped > 0, (case, default)
        assert default.dropped == sum(default.dropped_per_layer)
        # dropped routes change the output: the lossy baseline is visible
        assert default.max_abs_diff > 1e-3, (case, default)


@pytest.mark.multirank
def test_baseline_command_prints_table_and_json(capsys):
    # one rank keeps this end-to-end check cheap; the 4-rank test above covers the same rank function
    argv = "baseline --world-size 1 --tokens 48 --hidden 16 --ffn-hidden 16 --k 2 --iters 2 --skew 0.8 --json"
    code = cli_main(argv.split())
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["tokens_per_rank"] == [48] and record["world_size"] == 1 and record["ep_size"] == 1
    modes = {mode["mode"]: mode for mode in record["modes"]}
    assert set(modes) == {"deepspeed-default", "lossless"}
    assert modes["lossless"]["dropped"] == 0 and modes["lossless"]["max_abs_diff"] <= FP32_ATOL
    assert modes["deepspeed-default"]["dropped"] > 0
    assert modes["deepspeed-default"]["routes"] == 2 * 48 * 2
    assert modes["deepspeed-default"]["dropped"] == sum(modes["deepspeed-default"]["dropped_per_layer"])
    assert all(mode["median_forward_ms"] > 0 for mode in modes.values())
    header = next(line for line in lines if line.startswith("mode"))
    for column in ("ep_size", "world", "median fwd ms", "routes", "dropped routes (%)", "max |diff| vs ref"):
        assert column in header
    assert any(line.startswith("lossless") for line in lines)


def test_baseline_command_rejects_bad_arguments(capsys):
    assert cli_main(["baseline", "--world-size", "4", "--ep-size", "3"]) == 2
    assert "--ep-size (3) must be >= 1 and divide --world-size (4)" in capsys.readouterr().err
