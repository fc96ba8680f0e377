"""launch/generate.py --compare-vanilla: repeated timings summarised by median and range, and a vanilla
refusal that keeps GRACE's results (in-process: the generation itself is stubbed by its report)."""

from __future__ import annotations

import pytest
from generate import add_comparison, main

from ds_grace.config import GraceConfigError
from ds_grace.serving_comparison import Timing, comparison_line, speedup, timed_repeats, unless_refused


def test_timings_are_medians_with_their_range():
    samples = iter([(10.0, 2.0), (30.0, 1.0), (12.0, 5.0), (11.0, 1.5), (50.0, 1.2)])
    prefill, decode = timed_repeats(lambda: next(samples), repeats=5)
    assert prefill.as_dict() == {
        "median": 12.0,
        "min": 10.0,
        "max": 50.0,
        "samples": [10.0, 30.0, 12.0, 11.0, 50.0],
    }
    assert decode.median == 1.5
    ratio = speedup(Timing((20.0, 24.0, 40.0)), Timing((10.0, 12.0, 20.0)))
    assert ratio == {"median": 2.0, "min": 1.0, "max": 4.0}
    with pytest.raises(ValueError, match="repeats"):
        timed_repeats(lambda: (1.0, 1.0), repeats=0)


def test_a_refused_vanilla_is_kept_as_its_reason_and_other_errors_propagate():
    def refuse():
        raise GraceConfigError("the model's num_experts (6) must be divisible by the world size (4)")

    assert unless_refused(refuse) == (
        None,
        "the model's num_experts (6) must be divisible by the world size (4)",
    )
    assert unless_refused(lambda: {"mode": "vanilla"}) == ({"mode": "vanilla"}, None)
    with pytest.raises(RuntimeError):
        unless_refused(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def _report(mode: str, prefill: list[float], decode: list[float]) -> dict:
    return {
        "mode": mode,
        "family": "mixtral",
        "world_size": 4,
        "topology": {"num_nodes": 2, "gpus_per_node": 2},
        "max_new_tokens": 4,
        "prefill_ms": sorted(prefill)[len(prefill) // 2],
        "decode_ms_per_token": sorted(decode)[len(decode) // 2],
        "prefill_ms_runs": Timing(tuple(prefill)).as_dict(),
        "decode_ms_per_token_runs": Timing(tuple(decode)).as_dict(),
        "moe_stats": {},
        "results": [{"prompt": "a", "prompt_ids": [1], "new_token_ids": [5, 6], "text": "xy"}],
    }


def test_speedups_come_from_the_medians():
    report = _report("grace", [10.0, 11.0, 30.0], [1.0, 1.0, 2.0])
    add_comparison(report, _report("vanilla", [20.0, 22.0, 25.0], [3.0, 3.0, 3.0]), refused=None, repeats=3)
    assert report["speedup"]["prefill"] == pytest.approx({"median": 2.0, "min": 20 / 30, "max": 2.5})
    assert report["same_tokens"] is True
    assert comparison_line(report).startswith(
        "GRACE vs vanilla (median of 3 runs, range over them): prefill x2.00"
    )


def test_grace_results_are_printed_when_vanilla_is_refused(monkeypatch, capsys, tmp_path):
    import generate

    grace = _report("grace", [10.0, 12.0, 11.0], [1.0, 1.1, 1.2])

    def serve(args, config, prompt_ids, tokenizer):
        if config["grace"].get("enabled") is False:
            raise GraceConfigError(
                "vanilla DeepSpeed-MoE places num_experts / world_size experts on every rank: the model's "
                "num_experts (6) must be divisible by the world size (4)"
            )
        return grace

    class Tokenizer:
        def encode(self, text):
            return [1, 2]

    monkeypatch.setattr(generate, "serve_and_generate", serve)
    monkeypatch.setattr("ds_grace.profiling.load_text_tokenizer", lambda model: Tokenizer())
    monkeypatch.setattr("ds_grace.models.describe.check_checkpoint_folder", lambda path: "mixtral")
    config = tmp_path / "grace.json"
    config.write_text('{"dtype": "fp32", "grace": {"plan": {"path": "plan.json"}}}')
    args = ["--model", "m", "--ds-config", str(config), "--prompt", "a", "--compare-vanilla"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "grace (mixtral) on 2 nodes x 2 ranks" in out and "--- 'a'\nxy" in out
    assert "prefill 11.0 ms (10.0-12.0)" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("vanilla DeepSpeed-MoE refused this set-up (vanilla DeepSpeed-MoE places")
    assert last.endswith("GRACE's results above stand")
