"""Property-based fuzzing of the three inputs a user hands ds_grace: ds_configs, plans and trace archives.

Each example corrupts a valid input (a value swapped for one of another type or range, a field removed
or added, the file truncated or a byte flipped) and checks the only two outcomes allowed: the project's
clear error for that input (GraceConfigError, PlanError, TraceError), or a result equal to what the
input says, never another exception (a traceback), never a silently changed value. Examples are bounded
and every one runs in milliseconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_grace.config import GraceConfig, GraceConfigError, load_ds_config, parse_grace_block
from ds_grace.planning.build import build_plan
from ds_grace.planning.plan import GracePlan, PlanError
from ds_grace.topology import Topology
from ds_grace.trace import TraceError, load_trace, synthetic

FUZZ = settings(
    max_examples=60,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# JSON values of every type, with the edge cases configs and plans meet
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 0.5, 1.0, 2.9, 1e300, -0.0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["1", "auto", "tar", "true", ""]),
)
json_values = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=3),
    st.dictionaries(st.text(max_size=4), json_scalars, max_size=2),
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, (*prefix, index))
    return out


def _get(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value


def _set(value: Any, path: tuple, new: Any) -> None:
    _get(value, path[:-1])[path[-1]] = new


def _delete(value: Any, path: tuple) -> None:
    del _get(value, path[:-1])[path[-1]]


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same JSON type (True is not 1; 1 and 1.0 are both numbers)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# ---- configs ----

GRACE_DEFAULTS = GraceConfig().model_dump(mode="json")
CONFIG_PATHS = _paths(GRACE_DEFAULTS)


@FUZZ
@given(path=st.sampled_from(CONFIG_PATHS), value=json_values)
def test_a_grace_block_with_any_value_anywhere_is_parsed_as_written_or_refused(path, value):
    block = json.loads(json.dumps(GRACE_DEFAULTS))
    _set(block, path, value)
    try:
        parsed = parse_grace_block(block)
    except GraceConfigError as exc:
        assert str(exc).startswith("grace"), str(exc)
        return
    assert _same(_get(parsed.model_dump(mode="json"), path), value) or isinstance(value, dict)
    assert not (isinstance(value, float) and not math.isfinite(value)), "a non-finite number was accepted"


@FUZZ
@given(
    path=st.sampled_from(CONFIG_PATHS),
    action=st.sampled_from(["delete", "unknown"]),
    name=st.text(min_size=1, max_size=5),
)
def test_a_grace_block_missing_a_field_uses_its_default_and_an_unknown_one_is_refused(path, action, name):
    block = json.loads(json.dumps(GRACE_DEFAULTS))
    if action == "delete":
        _delete(block, path)
        assert parse_grace_block(block) == GraceConfig()  # every field has its documented default
        return
    parent = _get(block, path[:-1])
    if name in parent:
        return
    parent[name] = 1
    with pytest.raises(GraceConfigError, match=r"is not a known field"):
        parse_grace_block(block)


CONFIG_TEXT = json.dumps({"dtype": "fp32", "grace": GRACE_DEFAULTS}, indent=1)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(CONFIG_TEXT) - 1), flip=st.integers(0, 255))
def test_a_truncated_or_corrupted_config_file_is_refused_or_read_as_written(tmp_path_factory, cut, flip):
    folder = tmp_path_factory.mktemp("cfg")
    raw = bytearray(CONFIG_TEXT.encode())
    variants = [bytes(raw[:cut]), bytes(raw[:cut] + bytes([flip]) + raw[cut + 1 :])]
    for data in variants:
        path = folder / "ds_config.json"
        path.write_bytes(data)
        try:
            ds_config, grace = load_ds_config(path)
        except GraceConfigError:
            continue
        text = json.loads(data.decode())  # it parsed, so it is valid JSON and must be read as written
        assert ds_config == {k: v for k, v in text.items() if k != "grace"}
        expected = GraceConfig.model_validate(text["grace"]) if text.get("grace") is not None else None
        assert grace == (expected if expected is not None else GraceConfig(enabled=False))


# ---- plans ----


def _plan_text() -> tuple[dict, str]:
    trace = synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=200, seed=5)
    plan = build_plan(trace, topology=Topology(2, 2), config=GraceConfig())
    data = plan.to_dict()
    return data, json.dumps(data, indent=1)


PLAN_DICT, PLAN_TEXT = _plan_text()
PLAN = GracePlan.from_dict(PLAN_DICT)
PLAN_PATHS = _paths(PLAN_DICT)


def _load_plan(folder: Path, data: bytes) -> GracePlan | None:
    path = folder / "plan.json"
    path.write_bytes(data)
    try:
        return GracePlan.load(path)
    except PlanError as exc:
        assert str(exc).startswith(f"plan file ({path})"), str(exc)
        return None


@FUZZ
@given(path=st.sampled_from(PLAN_PATHS), value=json_values, delete=st.booleans())
def test_a_plan_with_any_field_changed_or_removed_is_refused_unless_nothing_changed(
    tmp_path_factory, path, value, delete
):
    data = json.loads(json.dumps(PLAN_DICT))
    if delete:
        _delete(data, path)
    else:
        _set(data, path, value)
    loaded = _load_plan(tmp_path_factory.mktemp("plan"), json.dumps(data).encode())
    if loaded is not None:  # only a change to an equal value of the same type may load, as the original
        assert not delete and _same(_get(PLAN_DICT, path), value)
        assert loaded == PLAN and loaded.to_dict() == PLAN_DICT


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(PLAN_TEXT) - 1), flip=st.integers(0, 255))
def test_a_truncated_or_corrupted_plan_file_is_refused_or_unchanged(tmp_path_factory, cut, flip):
    folder = tmp_path_factory.mktemp("plan")
    raw = bytearray(PLAN_TEXT.encode())
    assert _load_plan(folder, bytes(raw[:cut])) is None  # every strict prefix lacks a closing brace
    flipped = bytes(raw[:cut] + bytes([flip]) + raw[cut + 1 :])
    loaded = _load_plan(folder, flipped)
    if loaded is not None:  # e.g. whitespace for whitespace: the content is the same
        assert loaded.to_dict() == PLAN_DICT


# ---- trace archives ----

TRACE = synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=40, seed=3)


@pytest.fixture(scope="module")
def trace_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("trace") / "trace.npz"
    TRACE.save(path)
    return path.read_bytes()


def _load(folder: Path, data: bytes) -> Any:
    path = folder / "trace.npz"
    path.write_bytes(data)
    try:
        return load_trace(path)
    except TraceError as exc:
        assert str(exc).startswith(f"trace file ({path})"), str(exc)
        return None


@FUZZ
@given(data=st.data())
def test_a_truncated_or_corrupted_trace_archive_is_refused_or_unchanged(tmp_path_factory, trace_bytes, data):
    folder = tmp_path_factory.mktemp("trace")
    cut = data.draw(st.integers(min_value=0, max_value=len(trace_bytes) - 1))
    assert _load(folder, trace_bytes[:cut]) is None
    at = data.draw(st.integers(min_value=0, max_value=len(trace_bytes) - 1))
    flip = data.draw(st.integers(min_value=1, max_value=255))
    corrupted = bytearray(trace_bytes)
    corrupted[at] ^= flip
    loaded = _load(folder, bytes(corrupted))
    if loaded is not None:  # a byte zip does not read (a timestamp, a comment length of 0 ...)
        assert loaded.fingerprint == TRACE.fingerprint and loaded.metadata == TRACE.metadata


def _arrays() -> dict[str, np.ndarray]:
    arrays = {
        "format": np.array("ds_grace.routing_trace"),
        "version": np.array(1, dtype=np.int64),
        "kind": np.array("per_token"),
        "num_experts": np.array(TRACE.num_experts, dtype=np.int64),
        "metadata": np.array(json.dumps(dict(TRACE.metadata), sort_keys=True)),
        "num_layers": np.array(TRACE.num_layers, dtype=np.int64),
    }
    for layer in range(TRACE.num_layers):
        arrays[f"topk_ids_{layer}"] = TRACE.topk_ids[layer]
        if TRACE.gate_weights is not None:
            arrays[f"gate_weights_{layer}"] = TRACE.gate_weights[layer]
    return arrays


ARRAY_NAMES = sorted(_arrays())
swapped_arrays = st.sampled_from(
    [
        np.array(8.0),
        np.array(8.5),
        np.array(True),
        np.array("8"),
        np.array([8, 8]),
        np.array(-1),
        np.array(0),
        np.array(99),
        np.zeros((0, 2), dtype=np.int32),
        np.ones((40, 2), dtype=np.float32),
        np.ones((40, 2), dtype=bool),
        np.full((40, 2), "1"),
        np.full((40, 2), np.nan, dtype=np.float32),
        np.full((40, 2), 9, dtype=np.int32),
        np.array("{not json"),
        np.array("[]"),
    ]
)


@FUZZ
@given(name=st.sampled_from([*ARRAY_NAMES, "extra"]), value=swapped_arrays, delete=st.booleans())
def test_a_trace_archive_with_any_array_swapped_or_removed_is_refused_unless_nothing_changed(
    tmp_path_factory, name, value, delete
):
    folder = tmp_path_factory.mktemp("trace")
    arrays = _arrays()
    if delete and name in arrays:
        del arrays[name]
    else:
        arrays[name] = value
    with (folder / "raw.npz").open("wb") as handle:
        np.savez(handle, **arrays)
    loaded = _load(folder, (folder / "raw.npz").read_bytes())
    if loaded is not None:
        assert not delete and name != "extra"
        assert loaded.fingerprint == TRACE.fingerprint and loaded.metadata == TRACE.metadata
