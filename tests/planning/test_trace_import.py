"""Importers of real routing data: route logs, strict Mixtral/OLMoE parsing, import-trace, split-trace."""

import json

import numpy as np
import pytest

from ds_grace.cli import main as cli_main
from ds_grace.trace import (
    RoutingTrace,
    TraceError,
    load_mixtral_jsonl,
    load_olmoe_counts,
    load_route_logs,
    load_trace,
    packaged_traces_dir,
    split_trace,
)

TRACES = packaged_traces_dir()
QWEN_LAYERS = (0, 8, 12, 18, 23)
QWEN = [TRACES / "qwen15_moe" / f"moe_layer{layer}.jsonl" for layer in QWEN_LAYERS]
OLMOE_TOKENS = TRACES / "olmoe_tokens" / "moe_routes_layer0.jsonl"
MIXTRAL = TRACES / "mixtral" / "gsm8k_2_routing.jsonl"


def _write_log(path, routes, *, warmup=0, **header):
    head = {"type": "meta", "model_id": "test/model", "layers_logged": [0], "top_k": 2, "num_experts": 6}
    head.update(header)
    lines = [json.dumps(head)]
    layer = head["layers_logged"][0]
    for ids in [[4, 2]] * warmup + list(routes):
        lines.append(
            json.dumps(
                {
                    "type": "route",
                    "req_id": "r",
                    "token_idx": 0,
                    "layer": layer,
                    "topk_ids": ids,
                    "topk_weights": [0.5] * len(ids),
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_qwen_route_logs_combine_into_one_aligned_multilayer_trace():
    trace = load_route_logs(QWEN)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (5, 60, 4)
    assert trace.num_tokens == (4357,) * 5
    meta = trace.metadata
    assert meta["model_layers"] == list(QWEN_LAYERS) and meta["model_id"] == "Qwen/Qwen1.5-MoE-A2.7B-Chat"
    assert set(meta["warmup_routes"].values()) == {8448}
    assert "aligned by line order" in meta["assumptions"][0]
    ratio = trace.loads().max(axis=1) / trace.loads().mean(axis=1)
    assert 1.3 < ratio.min() and ratio.max() < 1.65  # the README's 1.36-1.60 for real tokens
    assert (trace.loads() > 0).all()
    assert trace.gate_weights is not None and float(trace.gate_weights[0].max()) < 1.0
    kept = load_route_logs(QWEN[:1], keep_warmup=True)
    assert kept.num_tokens == (4357 + 8448,) and kept.metadata["warmup_dropped"] is False


def test_olmoe_route_log_uses_its_header_expert_count():
    trace = load_route_logs([OLMOE_TOKENS])
    assert (trace.num_experts, trace.top_k, trace.num_tokens) == (64, 8, (4471,))
    assert trace.metadata["warmup_routes"] == {"moe_routes_layer0.jsonl:layer0": 2048}
    assert trace.metadata["assumptions"] == []
    loads = trace.loads()[0]
    assert 4.9 < loads.max() / loads.mean() < 5.3
    with pytest.raises(
        TraceError, match=r"num_experts \(60\) disagrees with the header's num_experts \(64\)"
    ):
        load_route_logs([OLMOE_TOKENS], num_experts=60)
    assert isinstance(load_trace(OLMOE_TOKENS), RoutingTrace)  # .jsonl with a header dispatches here


def test_warmup_blocks_anywhere_are_dropped_and_counted(tmp_path):
    real = [[i % 6, (i + 1) % 6] for i in range(40)]
    path = _write_log(tmp_path / "a.jsonl", real[:20] + [[5, 3]] * 70 + real[20:], warmup=100)
    trace = load_route_logs([path])
    assert trace.num_tokens == (40,) and trace.metadata["warmup_routes"] == {"a.jsonl:layer0": 170}
    assert trace.topk_ids[0].tolist() == real
    short_run = _write_log(tmp_path / "b.jsonl", real, warmup=63)
    assert load_route_logs([short_run]).num_tokens == (103,)  # 63 < the 64-line threshold: real tokens


def test_route_logs_must_keep_equal_tokens_and_distinct_layers(tmp_path):
    a = _write_log(tmp_path / "a.jsonl", [[0, 1], [2, 3]])
    b = _write_log(tmp_path / "b.jsonl", [[0, 1]], layers_logged=[5])
    with pytest.raises(TraceError, match="different numbers of tokens per layer"):
        load_route_logs([a, b])
    with pytest.raises(TraceError, match="model layer 0 is logged by both"):
        load_route_logs([a, a])


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"topk_ids": [1.7, 2]}, r"b.jsonl:2: field 'topk_ids'\[0\] \(1.7\) must be an integer expert id"),
        ({"topk_ids": [True, 2]}, r"b.jsonl:2: field 'topk_ids'\[0\] \(True\) must be an integer"),
        ({"topk_ids": [9, 2]}, r"b.jsonl:2: field 'topk_ids'\[0\] \(9\) must be in \[0, 6\)"),
        ({"topk_ids": [2, 2]}, r"b.jsonl:2: field 'topk_ids' \(\[2, 2\]\) chooses an expert twice"),
        ({"topk_ids": [1, 2, 3]}, r"b.jsonl:2: field 'topk_ids' has 3 ids, the header's top_k is 2"),
        ({"topk_weights": [-0.1, 0.5]}, r"b.jsonl:2: field 'topk_weights'\[0\] \(-0.1\) must be a finite"),
        ({"topk_weights": [float("nan"), 0.5]}, r"b.jsonl:2: not a JSON object \(NaN is not a finite"),
        ({"topk_weights": [0.5]}, r"b.jsonl:2: field 'topk_weights' \(\[0.5\]\) must be a list of 2"),
        ({"layer": 3}, r"b.jsonl:2: field 'layer' \(3\) must be one of the header's layers_logged \[0\]"),
        ({"type": "step"}, r"b.jsonl:2: field 'type' \('step'\) must be 'route'"),
    ],
)
def test_route_log_content_errors_name_file_line_and_field(tmp_path, route, message):
    record = {"type": "route", "layer": 0, "topk_ids": [1, 2], "topk_weights": [0.5, 0.5]} | route
    head = {"type": "meta", "model_id": "m", "layers_logged": [0], "top_k": 2, "num_experts": 6}
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(head) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(TraceError, match=message):
        load_route_logs([path])


def test_route_log_expert_count_is_never_guessed(tmp_path):
    path = _write_log(tmp_path / "u.jsonl", [[0, 1]], num_experts=None, model_id="unknown/model")
    with pytest.raises(TraceError, match=r"u.jsonl:1: the header gives no num_experts .* pass num_experts"):
        load_route_logs([path])
    assert load_route_logs([path], num_experts=4).num_experts == 4  # expert 3 never appears: still 4


def test_mixtral_import_is_strict(tmp_path):
    with pytest.raises(TraceError, match="records no expert count; pass num_experts"):
        load_mixtral_jsonl(MIXTRAL)
    bad = tmp_path / "m.jsonl"
    good = {
        "dataset": "d",
        "problem_id": 0,
        "layer": 0,
        "token_idx": 0,
        "experts": [1, 2],
        "gating_probs": [0.6, 0.4],
    }
    for change, message in [
        ({"experts": [99, 2]}, r"m.jsonl:1: field 'experts'\[0\] \(99\) must be in \[0, 8\)"),
        ({"experts": [1.7, 2]}, r"m.jsonl:1: field 'experts'\[0\] \(1.7\) must be an integer"),
        ({"experts": [True, 2]}, r"m.jsonl:1: field 'experts'\[0\] \(True\) must be an integer"),
        ({"gating_probs": [-0.5, 0.4]}, r"m.jsonl:1: field 'gating_probs'\[0\] \(-0.5\) must be a finite"),
        ({"layer": "0"}, r"m.jsonl:1: field 'layer' \('0'\) must be an integer >= 0"),
    ]:
        bad.write_text(json.dumps(good | change) + "\n")
        with pytest.raises(TraceError, match=message):
            load_mixtral_jsonl(bad, num_experts=8)
    repeated = [good | {"token_pos": 0} for _ in range(3)]
    for record in repeated:
        del record["token_idx"]
    bad.write_text("\n".join(json.dumps(r) for r in repeated) + "\n")
    with pytest.raises(TraceError, match=r"m.jsonl:2: token .* already has a record at layer 0 \(line 1\)"):
        load_mixtral_jsonl(bad, num_experts=8)
    by_order = load_mixtral_jsonl(bad, num_experts=8, token_identity="record_order")
    assert by_order.num_tokens == (3,) and "record order" in by_order.metadata["assumptions"][0]


def test_olmoe_counts_are_strict(tmp_path):
    path = tmp_path / "c.json"
    for layer, message in [
        ({"1.7": 3}, r"c.json: record 1 .*key '1.7': expert id must be a decimal integer"),
        ({"-1": 3}, r"key '-1': expert id must be a decimal integer"),
        ({"64": 3}, r"key '64': expert id 64 must be in \[0, 64\)"),
        ({"3": -2}, r"key '3': count \(-2\) must be a finite number >= 0"),
        ({"3": True}, r"key '3': count \(True\) must be a finite number"),
    ]:
        path.write_text(json.dumps([{"0": 1}, layer]))
        with pytest.raises(TraceError, match=message):
            load_olmoe_counts(path)
    path.write_text(json.dumps([{"0": 5}]))
    assert load_olmoe_counts(path).num_experts == 64  # OLMoE's 64, not the largest id + 1


def test_split_keeps_tokens_on_one_side_at_every_layer():
    trace = load_mixtral_jsonl(MIXTRAL, num_experts=8)
    first, rest = split_trace(trace, fraction=0.25)
    for layer in range(trace.num_layers):
        a, b = first.tokens_of(layer), rest.tokens_of(layer)
        assert len(a) + len(b) == trace.num_tokens[layer] and a.max() < b.min()
    assert first.metadata["split"]["tokens"] == round(0.25 * 247)
    with pytest.raises(TraceError, match=r"fraction \(1.0\) must be a number in \(0, 1\)"):
        split_trace(trace, fraction=1.0)


def test_import_and_split_commands(tmp_path, capsys):
    out = tmp_path / "q.npz"
    assert cli_main(["import-trace", *map(str, QWEN[:2]), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model_layers"] == [0, 8] and summary["tokens"] == [4357, 4357]
    assert summary["warmup_routes"] == {"moe_layer0.jsonl:layer0": 8448, "moe_layer8.jsonl:layer8": 8448}
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert cli_main(["split-trace", str(out), "--fraction", "0.5", "--out", str(a), str(b)]) == 0
    first, rest, whole = RoutingTrace.load(a), RoutingTrace.load(b), RoutingTrace.load(out)
    assert first.num_tokens == (2178, 2178) and rest.num_tokens == (2179, 2179)
    assert np.array_equal(np.concatenate([first.topk_ids[1], rest.topk_ids[1]]), whole.topk_ids[1])
    capsys.readouterr()
    assert cli_main(["import-trace", str(MIXTRAL), "--out", str(tmp_path / "m.npz")]) == 2
    assert "error: " in capsys.readouterr().err
    assert cli_main(["import-trace", str(MIXTRAL), str(OLMOE_TOKENS), "--out", str(tmp_path / "x.npz")]) == 2
    assert "different formats" in capsys.readouterr().err
    olmoe = TRACES / "olmoe" / "expert_counts" / "github.json"
    assert cli_main(["import-trace", str(olmoe), "--out", str(tmp_path / "o.npz")]) == 0
    assert load_trace(tmp_path / "o.npz").num_experts == 64
