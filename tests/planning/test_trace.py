import json
import zipfile

import numpy as np
import pytest

from ds_grace.planning.stats import (
    affinity_matrices,
    expert_loads,
    inter_layer_affinity,
    intra_layer_affinity,
)
from ds_grace.trace import (
    ExpertLoads,
    RoutingTrace,
    TraceError,
    derive_trace_from_loads,
    load_mixtral_jsonl,
    load_olmoe_counts,
    load_trace,
    packaged_traces_dir,
    synthetic,
)

TRACES = packaged_traces_dir()


def _small() -> RoutingTrace:
    return RoutingTrace(
        topk_ids=(np.array([[0, 1], [2, 3], [0, 2]]), np.array([[1, 0], [3, 2]])),
        num_experts=4,
        gate_weights=(np.full((3, 2), 0.5), np.full((2, 2), 0.5)),
        token_ids=(np.array([10, 11, 12]), np.array([12, 10])),
        metadata={"model": "toy"},
    )


def test_save_load_round_trip_keeps_everything(tmp_path):
    trace = _small()
    path = tmp_path / "t.npz"
    trace.save(path)
    loaded = RoutingTrace.load(path)
    assert loaded.fingerprint == trace.fingerprint
    assert loaded.metadata == {"model": "toy"}
    assert [ids.tolist() for ids in loaded.topk_ids] == [ids.tolist() for ids in trace.topk_ids]
    assert loaded.token_ids[1].tolist() == [12, 10]
    assert loaded.gate_weights[0].dtype == np.float32


def test_loads_round_trip_and_kind_check(tmp_path):
    loads = ExpertLoads(loads=np.array([[3.0, 1.0, 0.0]]), top_k=2, metadata={"m": 1})
    path = tmp_path / "l.npz"
    loads.save(path)
    loaded = load_trace(path)
    assert isinstance(loaded, ExpertLoads)
    assert loaded.fingerprint == loads.fingerprint and loaded.top_k == 2
    with pytest.raises(TraceError, match="holds expert loads only"):
        RoutingTrace.load(path)


def test_fingerprint_is_stable_and_sees_data_not_metadata():
    trace = _small()
    same = RoutingTrace(
        topk_ids=trace.topk_ids,
        num_experts=4,
        gate_weights=trace.gate_weights,
        token_ids=trace.token_ids,
        metadata={"other": True},
    )
    assert same.fingerprint == trace.fingerprint
    changed = RoutingTrace(
        topk_ids=(trace.topk_ids[0][::-1], trace.topk_ids[1]),
        num_experts=4,
        gate_weights=trace.gate_weights,
        token_ids=trace.token_ids,
    )
    assert changed.fingerprint != trace.fingerprint


def test_corrupt_and_mismatched_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(TraceError, match=r"garbage.npz\) is not a readable .npz archive"):
        load_trace(garbage)
    truncated = tmp_path / "truncated.npz"
    _small().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(TraceError, match="not a readable .npz archive"):
        load_trace(truncated)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.arange(3))
    with pytest.raises(TraceError, match="lacks the field 'format'"):
        load_trace(foreign)
    newer = tmp_path / "newer.npz"
    _small().save(newer)
    with zipfile.ZipFile(newer) as archive:
        arrays = {name[:-4]: np.load(archive.open(name)) for name in archive.namelist()}
    arrays["version"] = np.array(99)
    np.savez(newer, **arrays)
    with pytest.raises(TraceError, match=r"version \(99\) must be 1"):
        load_trace(newer)
    del arrays["topk_ids_1"]
    arrays["version"] = np.array(1)
    np.savez(newer, **arrays)
    with pytest.raises(TraceError, match="lacks the array 'topk_ids_1'"):
        load_trace(newer)
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk_ids": (np.array([[0, 4]]),), "num_experts": 4}, r"expert ids \(0..4\) must be in \[0, 4\)"),
        (
            {"topk_ids": (np.array([[1, 1]]),), "num_experts": 4},
            r"topk_ids\[0\]\[0\] \(\[1, 1\]\) chooses an expert twice",
        ),
        ({"topk_ids": (np.array([0, 1]),), "num_experts": 4}, r"must be an integer array \[T, K\]"),
        (
            {"topk_ids": (np.array([[0, 1]]),), "num_experts": 4, "gate_weights": (np.ones((2, 2)),)},
            r"gate_weights\[0\] shape \(2, 2\) must equal topk_ids shape \(1, 2\)",
        ),
        (
            {"topk_ids": (np.array([[0, 1], [1, 2]]),), "num_experts": 4, "token_ids": (np.array([5, 5]),)},
            r"token_ids\[0\] lists a token twice",
        ),
        ({"topk_ids": (), "num_experts": 4}, "needs >= 1 MoE layer"),
        ({"topk_ids": (np.array([[0]]),), "num_experts": 0}, r"num_experts \(0\) must be an integer >= 1"),
    ],
)
def test_invalid_traces_name_the_field(kwargs, message):
    with pytest.raises(TraceError, match=message):
        RoutingTrace(**kwargs)


def test_arrays_are_read_only():
    trace = _small()
    with pytest.raises(ValueError):
        trace.topk_ids[0][0, 0] = 3


def test_mixtral_import_links_tokens_across_layers():
    trace = load_mixtral_jsonl(TRACES / "mixtral" / "gsm8k_2_routing.jsonl", num_experts=8)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (32, 8, 2)
    assert trace.num_tokens[:3] == (246, 247, 247)
    assert sum(trace.num_tokens) == 7889
    assert trace.metadata["tokens"] == 247
    assert np.allclose(trace.gate_weights[0].sum(axis=1), 1.0, atol=1e-3)
    assert trace.topk_ids[0][0].tolist() == [7, 0]  # the file's first record, gate order kept
    linked = np.intersect1d(trace.tokens_of(0), trace.tokens_of(1))
    assert len(linked) >= 240
    load_ratio = trace.loads().max(axis=1) / trace.loads().mean(axis=1)
    assert 1.05 < load_ratio.min() and load_ratio.max() < 2.0


def test_mixtral_import_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"layer": 0, "experts": [1, 2], "token_idx": 0}\n{"layer": 0, "experts": [1, 2]}\n')
    with pytest.raises(TraceError, match=r"bad.jsonl:2: malformed routing record"):
        load_mixtral_jsonl(path, num_experts=8)


def test_olmoe_counts_import_gives_loads_only():
    loads = load_olmoe_counts(TRACES / "olmoe" / "expert_counts" / "wikipedia.json")
    assert loads.loads.shape == (3, 64) and loads.top_k == 8
    assert np.allclose(loads.loads.sum(axis=1), 8 * 208_896)
    assert loads.metadata["model_layers"] == [0, 7, 15]
    ratio = loads.loads.max(axis=1) / loads.loads.mean(axis=1)
    assert 4.5 < ratio.min() and ratio.max() < 7.0
    assert np.array_equal(expert_loads(loads), loads.loads)


def test_derived_trace_matches_olmoe_loads_exactly():
    loads = load_olmoe_counts(TRACES / "olmoe" / "expert_counts" / "github.json")
    derived = derive_trace_from_loads(loads, num_tokens=4096, seed=1)
    assert derived.num_tokens == (4096, 4096, 4096) and derived.top_k == 8
    expected = loads.loads / loads.loads.sum(axis=1, keepdims=True) * 4096 * 8
    assert np.abs(derived.loads() - expected).max() <= 1.0  # integer rounding only
    assert derived.loads().sum(axis=1).tolist() == [4096 * 8] * 3
    assert derived.metadata["derived_from_fingerprint"] == loads.fingerprint
    with pytest.raises(TraceError, match="would be chosen by"):
        derive_trace_from_loads(np.array([[100.0, 1.0, 1.0, 1.0]]), num_tokens=10, top_k=2)


def test_synthetic_skew_and_co_activation_are_tunable():
    flat = synthetic(num_layers=1, num_experts=16, top_k=2, num_tokens=8000, skew=0.0, co_activation=0.0)
    skewed = synthetic(num_layers=1, num_experts=16, top_k=2, num_tokens=8000, skew=1.5, co_activation=0.0)
    ratio = [t.loads()[0].max() / t.loads()[0].mean() for t in (flat, skewed)]
    assert ratio[0] < 1.2 < 2.0 < ratio[1]
    clustered = synthetic(
        num_layers=1, num_experts=16, top_k=2, num_tokens=8000, skew=0.0, co_activation=1.0, num_clusters=4
    )
    spread = [
        np.sort(affinity_matrices(t)[0].ravel())[::-1][:48].sum() / affinity_matrices(t)[0].sum()
        for t in (flat, clustered)
    ]
    assert spread[1] > spread[0] + 0.3  # in-cluster pairs dominate
    again = synthetic(num_layers=1, num_experts=16, top_k=2, num_tokens=8000, skew=1.5, co_activation=0.0)
    assert again.fingerprint == skewed.fingerprint


def test_affinity_statistics():
    trace = synthetic(num_layers=2, num_experts=8, top_k=3, num_tokens=500, seed=3)
    affinity = intra_layer_affinity(trace.topk_ids[0], 8)
    assert np.array_equal(affinity, affinity.T) and np.all(np.diag(affinity) == 0)
    assert np.allclose(affinity.sum(axis=1), (3 - 1) * trace.loads()[0])
    small = _small()
    between = inter_layer_affinity(small, 0)
    # tokens 10 and 12 appear in both layers (rows differ): 10: {0, 1} -> {3, 2}, 12: {0, 2} -> {1, 0}
    expected = np.zeros((4, 4))
    for here, there in (([0, 1], [3, 2]), ([0, 2], [1, 0])):
        for i in here:
            for j in there:
                expected[i, j] += 1
    assert np.array_equal(between, expected)
    with pytest.raises(TraceError, match=r"layer \(1\) must be in \[0, 1\)"):
        inter_layer_affinity(small, 1)


def test_relabel_experts_permutes_ids():
    trace = _small()
    relabelled = trace.relabel_experts([3, 2, 1, 0])
    assert relabelled.topk_ids[0].tolist() == [[3, 2], [1, 0], [3, 1]]
    with pytest.raises(TraceError, match="permutation"):
        trace.relabel_experts([0, 0, 1, 2])
    assert json.dumps(dict(relabelled.metadata))
