"""Routing traces: which experts every token chose, per MoE layer, and the expert loads they imply.

Shape legend: L layers, T tokens (of one layer), K top-k, E experts.

- ``RoutingTrace``: per layer, each token's top-k expert ids ``topk_ids_TK`` (gate order), optional gate
  weights ``gate_weights_TK`` and optional ``token_ids_T`` linking the same token across layers
  (without them, row i of every layer is token i).
- ``ExpertLoads``: aggregate counts only (``loads_LE``), for sources that record no per-token data.

File format (``save``/``load``): one uncompressed ``.npz`` archive holding ``format``
(``"ds_grace.routing_trace"``), ``version`` (1), ``kind`` (``"per_token"`` or ``"loads"``),
``num_experts``, ``metadata`` (a JSON string) and then either ``num_layers`` and per layer
``topk_ids_<l>`` (int32 [T, K]), ``gate_weights_<l>`` (float32 [T, K], optional),
``token_ids_<l>`` (int64 [T], optional), or ``loads`` (float64 [L, E]) and ``top_k`` (-1: unknown).
It is read with ``allow_pickle=False``.

Importers for real data (see ds_grace/data/traces/README.md), all strict (the expert count comes from the
source's metadata or the caller, every id is checked against it, errors name file, line and field):
``load_mixtral_jsonl`` (per token), ``load_olmoe_counts`` (loads only), ``load_route_logs`` (vLLM route
logs, several single-layer files into one trace, warm-up blocks dropped) and ``import_trace`` (any of
them, as ``ds-grace import-trace``); ``split_trace`` cuts a trace into a fitting and a held-out part. ``synthetic`` generates traces with tunable skew and
co-activation; ``derive_trace_from_loads`` builds a per-token trace whose loads equal given loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

TRACE_FORMAT = "ds_grace.routing_trace"
TRACE_FORMAT_VERSION = 1


class TraceError(ValueError):
    """A routing trace (or the file holding it) is malformed or does not match what uses it."""


def packaged_traces_dir() -> Path:
    """The real routing data shipped inside the package (ds_grace/data/traces)."""
    return Path(__file__).resolve().parent / "data" / "traces"


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def _hash_arrays(kind: str, num_experts: int, arrays: Sequence[tuple[str, np.ndarray | None]]) -> str:
    digest = hashlib.sha256(f"{TRACE_FORMAT}/{kind}/E={num_experts}".encode())
    for name, array in arrays:
        if array is None:
            digest.update(f"|{name}:none".encode())
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"|{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Per-token routing of L MoE layers. Arrays are copied and made read-only on construction."""

    topk_ids: tuple[np.ndarray, ...]
    num_experts: int
    gate_weights: tuple[np.ndarray, ...] | None = None
    token_ids: tuple[np.ndarray, ...] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        num_experts = self.num_experts
        if not isinstance(num_experts, (int, np.integer)) or isinstance(num_experts, bool) or num_experts < 1:
            raise TraceError(f"trace.num_experts ({num_experts!r}) must be an integer >= 1")
        object.__setattr__(self, "num_experts", int(num_experts))
        if len(self.topk_ids) == 0:
            raise TraceError("trace.topk_ids is empty; a trace needs >= 1 MoE layer")
        ids_list = [self._checked_ids(layer, ids) for layer, ids in enumerate(self.topk_ids)]
        top_ks = {ids.shape[1] for ids in ids_list}
        if len(top_ks) != 1:
            raise TraceError(f"trace.topk_ids: every layer must have the same top-k, got {sorted(top_ks)}")
        object.__setattr__(self, "topk_ids", tuple(ids_list))
        if self.gate_weights is not None:
            object.__setattr__(
                self, "gate_weights", self._checked_per_layer("gate_weights", self.gate_weights)
            )
        if self.token_ids is not None:
            object.__setattr__(self, "token_ids", self._checked_per_layer("token_ids", self.token_ids))
        try:
            json.dumps(dict(self.metadata))
        except TypeError as exc:
            raise TraceError(f"trace.metadata must be JSON-serialisable: {exc}") from None
        object.__setattr__(self, "metadata", dict(self.metadata))

    def _checked_ids(self, layer: int, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TraceError(
                f"trace.topk_ids[{layer}] (dtype {ids.dtype}, shape {ids.shape}) must be an integer array [T, K]"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise TraceError(
                f"trace.topk_ids[{layer}] expert ids ({int(ids.min())}..{int(ids.max())}) must be in "
                f"[0, {self.num_experts})"
            )
        if ids.shape[1] > 1:
            sorted_TK = np.sort(ids, axis=1)
            repeated_T = (sorted_TK[:, 1:] == sorted_TK[:, :-1]).any(axis=1)
            if repeated_T.any():
                row = int(np.flatnonzero(repeated_T)[0])
                raise TraceError(
                    f"trace.topk_ids[{layer}][{row}] ({ids[row].tolist()}) chooses an expert twice; "
                    "top-k ids of a token must be distinct"
                )
        return _frozen(ids.astype(np.int32, copy=False))

    def _checked_per_layer(self, name: str, arrays: Sequence[Any]) -> tuple[np.ndarray, ...]:
        if len(arrays) != len(self.topk_ids):
            raise TraceError(
                f"trace.{name} has {len(arrays)} layers, trace.topk_ids has {len(self.topk_ids)}"
            )
        checked = []
        for layer, (array, ids) in enumerate(zip(arrays, self.topk_ids)):
            array = np.asarray(array)
            if name == "gate_weights":
                if array.shape != ids.shape:
                    raise TraceError(
                        f"trace.gate_weights[{layer}] shape {array.shape} must equal topk_ids shape {ids.shape}"
                    )
                if not np.all(np.isfinite(array)):
                    raise TraceError(f"trace.gate_weights[{layer}] must be finite")
                checked.append(_frozen(array.astype(np.float32, copy=False)))
            else:
                if array.shape != (ids.shape[0],) or not np.issubdtype(array.dtype, np.integer):
                    raise TraceError(
                        f"trace.token_ids[{layer}] (dtype {array.dtype}, shape {array.shape}) must be an "
                        f"integer array of shape ({ids.shape[0]},)"
                    )
                if len(np.unique(array)) != len(array):
                    raise TraceError(
                        f"trace.token_ids[{layer}] lists a token twice; ids must be unique per layer"
                    )
                checked.append(_frozen(array.astype(np.int64, copy=False)))
        return tuple(checked)

    @property
    def num_layers(self) -> int:
        return len(self.topk_ids)

    @property
    def top_k(self) -> int:
        return int(self.topk_ids[0].shape[1])

    @property
    def num_tokens(self) -> tuple[int, ...]:
        """Tokens recorded at each layer."""
        return tuple(int(ids.shape[0]) for ids in self.topk_ids)

    def tokens_of(self, layer: int) -> np.ndarray:
        """Token ids of the rows of `layer` (row index when the trace has no token ids)."""
        if self.token_ids is not None:
            return self.token_ids[layer]
        return np.arange(self.topk_ids[layer].shape[0], dtype=np.int64)

    def loads(self) -> np.ndarray:
        """loads_LE: (token, expert) assignments per expert and layer."""
        return np.stack(
            [np.bincount(ids.ravel(), minlength=self.num_experts) for ids in self.topk_ids]
        ).astype(np.float64)

    @cached_property
    def fingerprint(self) -> str:
        """Stable hash of the routing data (ids, gate weights, token ids, num_experts; not metadata)."""
        arrays: list[tuple[str, np.ndarray | None]] = []
        for layer in range(self.num_layers):
            arrays.append((f"topk_ids_{layer}", self.topk_ids[layer]))
            arrays.append(
                (f"gate_weights_{layer}", None if self.gate_weights is None else self.gate_weights[layer])
            )
            arrays.append((f"token_ids_{layer}", None if self.token_ids is None else self.token_ids[layer]))
        return _hash_arrays("per_token", self.num_experts, arrays)

    def relabel_experts(self, expert2new_E: Sequence[int] | np.ndarray) -> RoutingTrace:
        """The same routing with expert e renamed expert2new_E[e] in every layer."""
        expert2new = _checked_permutation(expert2new_E, self.num_experts)
        return RoutingTrace(
            topk_ids=tuple(expert2new[ids] for ids in self.topk_ids),
            num_experts=self.num_experts,
            gate_weights=self.gate_weights,
            token_ids=self.token_ids,
            metadata=self.metadata,
        )

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {
            **_header("per_token", self.num_experts, self.metadata),
            "num_layers": np.array(self.num_layers, dtype=np.int64),
        }
        for layer in range(self.num_layers):
            arrays[f"topk_ids_{layer}"] = self.topk_ids[layer]
            if self.gate_weights is not None:
                arrays[f"gate_weights_{layer}"] = self.gate_weights[layer]
            if self.token_ids is not None:
                arrays[f"token_ids_{layer}"] = self.token_ids[layer]
        _write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        trace = load_trace(path)
        if not isinstance(trace, RoutingTrace):
            raise TraceError(f"trace file ({path}) holds expert loads only, not per-token routing")
        return trace


@dataclass(frozen=True, eq=False)
class ExpertLoads:
    """Aggregate routing counts: loads_LE[l, e] = tokens that chose expert e at layer l."""

    loads: np.ndarray
    top_k: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        loads = np.asarray(self.loads, dtype=np.float64)
        if loads.ndim != 2 or loads.shape[0] < 1 or loads.shape[1] < 1:
            raise TraceError(f"loads (shape {loads.shape}) must be a non-empty array [L, E]")
        if not np.all(np.isfinite(loads)) or loads.min() < 0:
            raise TraceError("loads must be finite and >= 0")
        object.__setattr__(self, "loads", _frozen(loads))
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1):
            raise TraceError(f"loads.top_k ({self.top_k!r}) must be an integer >= 1 or None")
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def num_layers(self) -> int:
        return int(self.loads.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.loads.shape[1])

    @cached_property
    def fingerprint(self) -> str:
        top_k = np.array(-1 if self.top_k is None else self.top_k, dtype=np.int64)
        return _hash_arrays("loads", self.num_experts, [("loads", self.loads), ("top_k", top_k)])

    def relabel_experts(self, expert2new_E: Sequence[int] | np.ndarray) -> ExpertLoads:
        expert2new = _checked_permutation(expert2new_E, self.num_experts)
        relabelled = np.empty_like(self.loads)
        relabelled[:, expert2new] = self.loads
        return ExpertLoads(loads=relabelled, top_k=self.top_k, metadata=self.metadata)

    def save(self, path: str | Path) -> None:
        _write_npz(
            path,
            {
                **_header("loads", self.num_experts, self.metadata),
                "loads": self.loads,
                "top_k": np.array(-1 if self.top_k is None else self.top_k, dtype=np.int64),
            },
        )


def _checked_permutation(expert2new_E: Sequence[int] | np.ndarray, num_experts: int) -> np.ndarray:
    expert2new = np.asarray(expert2new_E, dtype=np.int64)
    if expert2new.shape != (num_experts,) or not np.array_equal(np.sort(expert2new), np.arange(num_experts)):
        raise TraceError(f"expert2new_E must be a permutation of range({num_experts})")
    return expert2new


def _header(kind: str, num_experts: int, metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {
        "format": np.array(TRACE_FORMAT),
        "version": np.array(TRACE_FORMAT_VERSION, dtype=np.int64),
        "kind": np.array(kind),
        "num_experts": np.array(num_experts, dtype=np.int64),
        "metadata": np.array(json.dumps(dict(metadata), sort_keys=True)),
    }


def _write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    path = Path(path)
    with path.open("wb") as handle:  # a file object keeps numpy from appending ".npz"
        np.savez(handle, **arrays)


def load_trace(path: str | Path) -> RoutingTrace | ExpertLoads:
    """Load any supported trace file: ``.npz`` (this package's format), Mixtral ``.jsonl``, OLMoE ``.json``."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file ({path}) does not exist")
    if path.suffix == ".jsonl":
        return load_mixtral_jsonl(path)
    if path.suffix == ".json":
        return load_olmoe_counts(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise TraceError(f"trace file ({path}) is not a readable .npz archive: {exc}") from None
    return _from_arrays(path, arrays)


def _from_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> RoutingTrace | ExpertLoads:
    def scalar(name: str) -> Any:
        if name not in arrays:
            raise TraceError(f"trace file ({path}) lacks the field {name!r}; is it a {TRACE_FORMAT} file?")
        return arrays[name].item()

    if scalar("format") != TRACE_FORMAT:
        raise TraceError(f"trace file ({path}) format ({scalar('format')!r}) must be {TRACE_FORMAT!r}")
    version = scalar("version")
    if version != TRACE_FORMAT_VERSION:
        raise TraceError(f"trace file ({path}) version ({version}) must be {TRACE_FORMAT_VERSION}")
    try:
        metadata = json.loads(scalar("metadata"))
    except json.JSONDecodeError as exc:
        raise TraceError(f"trace file ({path}) field 'metadata' is not valid JSON: {exc}") from None
    kind, num_experts = scalar("kind"), int(scalar("num_experts"))
    try:
        if kind == "loads":
            top_k = int(scalar("top_k"))
            loads = ExpertLoads(loads=arrays["loads"], top_k=None if top_k < 0 else top_k, metadata=metadata)
            if loads.num_experts != num_experts:
                raise TraceError(f"loads has {loads.num_experts} experts but num_experts is {num_experts}")
            return loads
        if kind != "per_token":
            raise TraceError(f"field 'kind' ({kind!r}) must be 'per_token' or 'loads'")
        num_layers = int(scalar("num_layers"))
        ids = [arrays[f"topk_ids_{layer}"] for layer in range(num_layers)]
        has_weights = "gate_weights_0" in arrays
        has_tokens = "token_ids_0" in arrays
        return RoutingTrace(
            topk_ids=tuple(ids),
            num_experts=num_experts,
            gate_weights=tuple(arrays[f"gate_weights_{i}"] for i in range(num_layers))
            if has_weights
            else None,
            token_ids=tuple(arrays[f"token_ids_{i}"] for i in range(num_layers)) if has_tokens else None,
            metadata=metadata,
        )
    except KeyError as exc:
        raise TraceError(f"trace file ({path}) lacks the array {exc}") from None
    except TraceError as exc:
        raise TraceError(f"trace file ({path}): {exc}") from None


# ---------------------------------------------------------------------------------------------
# Importers of real routing data. They are strict: the expert count comes from the source's own
# metadata or from the caller (never from the largest id seen), every id is checked against it, and
# every content error names the file, the line (or record) and the field.

OLMOE_NUM_EXPERTS = 64  # OLMoE-1B-7B routes to 64 experts per MoE layer (its config.json: num_experts)

# Route logs whose header names the model but not its expert count: the routed experts per MoE
# layer from the model's published config.json (Qwen1.5-MoE-A2.7B: num_experts 60; OLMoE: 64).
MODEL_NUM_EXPERTS: dict[str, int] = {
    "Qwen/Qwen1.5-MoE-A2.7B": 60,
    "Qwen/Qwen1.5-MoE-A2.7B-Chat": 60,
    "allenai/OLMoE-1B-7B-0924": 64,
    "allenai/OLMoE-1B-7B-0924-Instruct": 64,
}

# A warm-up block: at least this many consecutive route lines of one layer choosing the same id
# tuple. The shipped logs' warm-up blocks are 8,448 (Qwen1.5) and 2,048 (OLMoE) lines long; their real
# tokens repeat a tuple at most 7 times in a row.
WARMUP_MIN_RUN = 64


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_num_experts(num_experts: Any, where: str) -> int:
    if not _is_int(num_experts) or num_experts < 1:
        raise TraceError(f"{where}: num_experts ({num_experts!r}) must be an integer >= 1")
    return int(num_experts)


def _strict_ids(values: Any, *, where: str, field_name: str, num_experts: int) -> list[int]:
    if not isinstance(values, list) or not values:
        raise TraceError(f"{where}: field {field_name!r} ({values!r}) must be a non-empty list of expert ids")
    for index, value in enumerate(values):
        if not _is_int(value):
            raise TraceError(
                f"{where}: field {field_name!r}[{index}] ({value!r}) must be an integer expert id"
            )
        if not 0 <= value < num_experts:
            raise TraceError(
                f"{where}: field {field_name!r}[{index}] ({value}) must be in [0, {num_experts}) "
                f"(num_experts {num_experts})"
            )
    if len(set(values)) != len(values):
        raise TraceError(f"{where}: field {field_name!r} ({values}) chooses an expert twice")
    return values


def _strict_weights(values: Any, *, where: str, field_name: str, length: int) -> list[float]:
    if not isinstance(values, list) or len(values) != length:
        raise TraceError(f"{where}: field {field_name!r} ({values!r}) must be a list of {length} numbers")
    for index, value in enumerate(values):
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise TraceError(
                f"{where}: field {field_name!r}[{index}] ({value!r}) must be a finite number >= 0"
            )
    return values


def _json_lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) of every non-blank line; a line that is not JSON is an error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TraceError(f"trace file ({path}) does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError, OSError) as exc:
        raise TraceError(f"trace file ({path}) cannot be read as text: {exc}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_reject_constant)
        except (json.JSONDecodeError, TraceError) as exc:
            raise TraceError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(record, dict):
            raise TraceError(f"{path}:{number}: must be a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise TraceError(f"trace file ({path}) holds no records")
    return records


def _reject_constant(name: str) -> float:
    raise TraceError(f"{name} is not a finite number")


def is_route_log(path: str | Path) -> bool:
    """Whether `path`'s first non-blank line is a route-log header ({"type": "meta", ...})."""
    try:
        with Path(path).open() as handle:
            for line in handle:
                if line.strip():
                    head = json.loads(line)
                    return isinstance(head, dict) and head.get("type") == "meta"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def load_mixtral_jsonl(
    path: str | Path, *, num_experts: int | None = None, token_identity: str = "key"
) -> RoutingTrace:
    """Import per-token routing recorded as JSON lines, one object per (token, layer).

    Each line holds ``layer``, ``experts`` (top-k ids in gate order), ``gating_probs`` (optional),
    and identifies its token by (``dataset``, ``problem_id``, ``token_idx`` or ``token_pos``).
    These records carry no expert count, so ``num_experts`` is required (8 for Mixtral-8x7B); a file
    whose first line is a route-log header is read by ``load_route_logs`` instead (its header gives it).

    ``token_identity``: ``"key"`` numbers the distinct (dataset, problem_id, position) keys in order of
    first appearance, so rows link across layers, and a key repeated within a layer is an error;
    ``"record_order"`` takes the i-th record of every layer as token i (for files whose positions repeat;
    recorded in the metadata as an assumption).
    """
    path = Path(path)
    if num_experts is None and is_route_log(path):
        return load_route_logs([path])
    if token_identity not in ("key", "record_order"):
        raise TraceError(f"token_identity ({token_identity!r}) must be 'key' or 'record_order'")
    if num_experts is None:
        raise TraceError(
            f"trace file ({path}) records no expert count; pass num_experts "
            "(ds-grace import-trace --num-experts N; Mixtral-8x7B: 8)"
        )
    num_experts = _checked_num_experts(num_experts, str(path))
    token2id: dict[tuple[Any, ...], int] = {}
    first_line: dict[tuple[int, int], int] = {}
    per_layer: dict[int, list[tuple[int, list[int], list[float] | None]]] = {}
    top_k = None
    with_probs = None
    for number, record in _json_lines(path):
        where = f"{path}:{number}"
        missing = [name for name in ("layer", "experts") if name not in record]
        if "token_idx" not in record and "token_pos" not in record:
            missing.append("token_idx")
        if missing:
            raise TraceError(f"{where}: malformed routing record: field {missing[0]!r} is missing")
        position = record["token_idx"] if "token_idx" in record else record["token_pos"]
        if not _is_int(position) or position < 0:
            raise TraceError(f"{where}: field 'token_idx' ({position!r}) must be an integer >= 0")
        layer = record["layer"]
        if not _is_int(layer) or layer < 0:
            raise TraceError(f"{where}: field 'layer' ({layer!r}) must be an integer >= 0")
        experts = _strict_ids(record["experts"], where=where, field_name="experts", num_experts=num_experts)
        if top_k is None:
            top_k = len(experts)
        elif len(experts) != top_k:
            raise TraceError(f"{where}: field 'experts' has {len(experts)} ids, earlier records {top_k}")
        probs = record.get("gating_probs")
        if with_probs is None:
            with_probs = probs is not None
        elif with_probs != (probs is not None):
            raise TraceError(f"{where}: field 'gating_probs' must be present in every record or in none")
        if probs is not None:
            probs = _strict_weights(probs, where=where, field_name="gating_probs", length=len(experts))
        records = per_layer.setdefault(layer, [])
        if token_identity == "record_order":
            token = len(records)
        else:
            key = (record.get("dataset"), record.get("problem_id"), position)
            token = token2id.setdefault(key, len(token2id))
            if (layer, token) in first_line:
                raise TraceError(
                    f"{where}: token (dataset {key[0]!r}, problem_id {key[1]!r}, position {position}) "
                    f"already has a record at layer {layer} (line {first_line[layer, token]}); identify "
                    "tokens by record order (token_identity='record_order', import-trace --token-order)"
                )
            first_line[layer, token] = number
        records.append((token, experts, probs))
    layers = sorted(per_layer)
    if layers != list(range(len(layers))):
        raise TraceError(
            f"trace file ({path}) layers ({layers}) must be 0..{len(layers) - 1} with none missing"
        )
    topk_ids, gate_weights, token_ids = [], [], []
    for layer in layers:
        records = sorted(per_layer[layer], key=lambda rec: rec[0])
        token_ids.append(np.array([rec[0] for rec in records], dtype=np.int64))
        topk_ids.append(np.array([rec[1] for rec in records], dtype=np.int64))
        if with_probs:
            gate_weights.append(np.array([rec[2] for rec in records], dtype=np.float32))
    datasets = sorted({str(key[0]) for key in token2id})
    metadata: dict[str, Any] = {
        "format": "mixtral_jsonl",
        "file": path.name,
        "token_identity": token_identity,
        "tokens": len(token2id) if token_identity == "key" else max(len(r) for r in per_layer.values()),
    }
    if token_identity == "key":
        metadata["datasets"] = datasets
    else:
        metadata["assumptions"] = [
            "tokens identified by record order: the i-th record of every layer is taken as token i"
        ]
    return RoutingTrace(
        topk_ids=tuple(topk_ids),
        num_experts=num_experts,
        gate_weights=tuple(gate_weights) if with_probs else None,
        token_ids=tuple(token_ids),
        metadata=metadata,
    )


def load_olmoe_counts(
    path: str | Path, *, num_experts: int = OLMOE_NUM_EXPERTS, top_k: int | None = 8
) -> ExpertLoads:
    """Import aggregate expert counts: a JSON list (one entry per MoE layer) of {expert id: count}.

    Only loads: the file holds no per-token data. The file records no expert count: ``num_experts``
    defaults to OLMoE-1B-7B's 64 and ``top_k`` to its 8 (the counts sum to top_k x tokens); every id is
    checked against num_experts. Experts absent from a layer have load 0. Keys must be decimal integer
    strings, counts finite numbers >= 0; errors name the file, the record (layer) and the key.
    """
    path = Path(path)
    num_experts = _checked_num_experts(num_experts, str(path))
    try:
        data = json.loads(path.read_text(), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise TraceError(f"trace file ({path}) does not exist") from None
    except (json.JSONDecodeError, TraceError, UnicodeDecodeError, OSError) as exc:
        raise TraceError(f"trace file ({path}) is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data or not all(isinstance(layer, dict) for layer in data):
        raise TraceError(
            f"trace file ({path}) must hold a non-empty JSON list of {{expert id: count}} objects"
        )
    loads = np.zeros((len(data), num_experts))
    for record, layer_counts in enumerate(data):
        for key, count in layer_counts.items():
            where = f"{path}: record {record} (layer entry {record}), key {key!r}"
            if "," in key:
                raise TraceError(
                    f"{where}: is an expert pair; this file holds cross-layer pair counts, not expert counts"
                )
            if not (key.isascii() and key.isdigit()):
                raise TraceError(f"{where}: expert id must be a decimal integer >= 0")
            expert = int(key)
            if expert >= num_experts:
                raise TraceError(f"{where}: expert id {expert} must be in [0, {num_experts}) (num_experts)")
            if not _is_number(count) or not math.isfinite(count) or count < 0:
                raise TraceError(f"{where}: count ({count!r}) must be a finite number >= 0")
            loads[record, expert] = count
    metadata: dict[str, Any] = {"format": "olmoe_expert_counts", "file": path.name}
    if len(data) == 3:
        metadata["model_layers"] = [0, 7, 15]  # the layers these files record (see the data README)
    return ExpertLoads(loads=loads, top_k=top_k, metadata=metadata)


@dataclass
class _RouteStream:
    """The route lines of one model layer in one route-log file, in line order."""

    file: Path
    layer: int
    lines: list[int] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)


def _warmup_mask(ids_TK: np.ndarray, min_run: int) -> np.ndarray:
    """warmup_T: rows inside a run of >= min_run consecutive identical id tuples."""
    num_tokens = ids_TK.shape[0]
    if num_tokens == 0:
        return np.zeros(0, dtype=bool)
    starts_T = np.ones(num_tokens, dtype=bool)
    starts_T[1:] = (ids_TK[1:] != ids_TK[:-1]).any(axis=1)
    run_starts = np.flatnonzero(starts_T)
    run_lengths = np.diff(np.append(run_starts, num_tokens))
    return np.repeat(run_lengths >= min_run, run_lengths)


def _read_route_log(
    path: Path, *, num_experts: int | None
) -> tuple[dict[str, Any], int, int, dict[int, _RouteStream]]:
    records = _json_lines(path)
    header_line, header = records[0]
    if header.get("type") != "meta":
        raise TraceError(
            f"{path}:{header_line}: field 'type' ({header.get('type')!r}) must be 'meta': a route log starts "
            "with its header line"
        )
    where = f"{path}:{header_line}"
    top_k = header.get("top_k")
    if not _is_int(top_k) or top_k < 1:
        raise TraceError(f"{where}: field 'top_k' ({top_k!r}) must be an integer >= 1")
    layers_logged = header.get("layers_logged")
    if (
        not isinstance(layers_logged, list)
        or not layers_logged
        or not all(_is_int(layer) and layer >= 0 for layer in layers_logged)
    ):
        raise TraceError(f"{where}: field 'layers_logged' ({layers_logged!r}) must be a list of layers >= 0")
    source_experts = header.get("num_experts")
    model_id = header.get("model_id")
    if source_experts is not None:
        source_experts = _checked_num_experts(source_experts, f"{where}: field 'num_experts'")
        origin = "the header's num_experts"
    elif isinstance(model_id, str) and model_id in MODEL_NUM_EXPERTS:
        source_experts, origin = MODEL_NUM_EXPERTS[model_id], f"the config of {model_id}"
    else:
        origin = None
    if num_experts is None:
        if source_experts is None:
            raise TraceError(
                f"{where}: the header gives no num_experts and its model_id ({model_id!r}) is not a known "
                "model; pass num_experts (ds-grace import-trace --num-experts N)"
            )
        num_experts = source_experts
    elif source_experts is not None and source_experts != num_experts:
        raise TraceError(f"num_experts ({num_experts}) disagrees with {origin} ({source_experts}) in {path}")
    streams = {layer: _RouteStream(file=path, layer=layer) for layer in layers_logged}
    for number, record in records[1:]:
        where = f"{path}:{number}"
        if record.get("type") != "route":
            raise TraceError(f"{where}: field 'type' ({record.get('type')!r}) must be 'route'")
        layer = record.get("layer")
        if not _is_int(layer) or layer not in streams:
            raise TraceError(
                f"{where}: field 'layer' ({layer!r}) must be one of the header's layers_logged {layers_logged}"
            )
        ids = _strict_ids(record.get("topk_ids"), where=where, field_name="topk_ids", num_experts=num_experts)
        if len(ids) != top_k:
            raise TraceError(f"{where}: field 'topk_ids' has {len(ids)} ids, the header's top_k is {top_k}")
        weights = _strict_weights(
            record.get("topk_weights"), where=where, field_name="topk_weights", length=top_k
        )
        stream = streams[layer]
        stream.lines.append(number)
        stream.ids.append(ids)
        stream.weights.append(weights)
    for stream in streams.values():
        if not stream.ids:
            raise TraceError(f"trace file ({path}) holds no route lines for layer {stream.layer}")
    return header, num_experts, top_k, streams


def load_route_logs(
    paths: Sequence[str | Path],
    *,
    num_experts: int | None = None,
    keep_warmup: bool = False,
    warmup_min_run: int = WARMUP_MIN_RUN,
) -> RoutingTrace:
    """Import route logs (vLLM MoE loggers; ``qwen15_moe/``, ``olmoe_tokens/``) into one RoutingTrace.

    A route log is JSON lines: a header ``{"type": "meta", "top_k": K, "layers_logged": [...], ...}``, then
    one ``{"type": "route", "layer": l, "topk_ids": [...], "topk_weights": [...]}`` line per token.
    The expert count is the header's ``num_experts``, or the routed experts of its ``model_id``
    (``MODEL_NUM_EXPERTS``), or ``num_experts``; where two are given they must agree, and every id is
    checked against it.

    Warm-up: a block of >= ``warmup_min_run`` consecutive lines of one layer with the same id tuple is
    an engine warm-up pass on dummy input; such blocks are dropped (``keep_warmup=True`` keeps them) and
    counted in the metadata (``warmup_routes``, per file and layer).

    Several files (or layers of one file) combine into one trace with one layer per model layer,
    in model-layer order (``metadata["model_layers"]``). Rows are aligned by line order: the i-th kept
    route line of every layer is taken as the same token. Nothing in the files proves this, so it is
    recorded in ``metadata["assumptions"]``, and every layer must keep the same number of lines.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise TraceError("load_route_logs needs at least one file")
    if not _is_int(warmup_min_run) or warmup_min_run < 2:
        raise TraceError(f"warmup_min_run ({warmup_min_run!r}) must be an integer >= 2")
    streams: dict[int, _RouteStream] = {}
    headers, top_ks = [], set()
    for raw_path in paths:
        path = Path(raw_path)
        header, num_experts, top_k, file_streams = _read_route_log(path, num_experts=num_experts)
        headers.append(header)
        top_ks.add(top_k)
        for layer, stream in file_streams.items():
            if layer in streams:
                raise TraceError(f"model layer {layer} is logged by both {streams[layer].file} and {path}")
            streams[layer] = stream
    if len(top_ks) != 1:
        raise TraceError(f"route logs {[str(p) for p in paths]} disagree on top_k ({sorted(top_ks)})")
    model_ids = sorted({str(header.get("model_id")) for header in headers})
    if len(model_ids) != 1:
        raise TraceError(f"route logs {[str(p) for p in paths]} come from different models ({model_ids})")
    layers = sorted(streams)
    topk_ids, gate_weights, warmup = [], [], {}
    for layer in layers:
        stream = streams[layer]
        ids_TK = np.array(stream.ids, dtype=np.int64)
        weights_TK = np.array(stream.weights, dtype=np.float32)
        warmup_T = _warmup_mask(ids_TK, warmup_min_run)
        warmup[f"{stream.file.name}:layer{layer}"] = int(warmup_T.sum())
        keep_T = np.ones_like(warmup_T) if keep_warmup else ~warmup_T
        if not keep_T.any():
            raise TraceError(
                f"{stream.file} layer {layer}: every route line is in a warm-up block; nothing is left "
                "(keep_warmup=True, import-trace --keep-warmup, keeps them)"
            )
        topk_ids.append(ids_TK[keep_T])
        gate_weights.append(weights_TK[keep_T])
    counts = {f"{streams[layer].file.name}:layer{layer}": len(ids) for layer, ids in zip(layers, topk_ids)}
    if len(set(counts.values())) != 1:
        raise TraceError(
            f"route logs keep different numbers of tokens per layer ({counts}); rows align by line order, "
            "so every layer must keep the same number"
        )
    assumptions = []
    if len(layers) > 1:
        assumptions.append(
            "layers aligned by line order: the i-th kept route line of every layer is taken as the same "
            "token (not verified by the files)"
        )
    metadata = {
        "format": "route_log",
        "files": [Path(p).name for p in paths],
        "model_id": model_ids[0],
        "model_layers": layers,
        "tokens": len(topk_ids[0]),
        "warmup_routes": warmup,
        "warmup_dropped": not keep_warmup,
        "warmup_min_run": warmup_min_run,
        "assumptions": assumptions,
    }
    return RoutingTrace(
        topk_ids=tuple(topk_ids),
        num_experts=num_experts,
        gate_weights=tuple(gate_weights),
        metadata=metadata,
    )


IMPORT_FORMATS = ("auto", "mixtral", "olmoe-counts", "route-log")


def import_trace(
    paths: Sequence[str | Path],
    *,
    source_format: str = "auto",
    num_experts: int | None = None,
    token_identity: str = "key",
    keep_warmup: bool = False,
    top_k: int | None = None,
) -> RoutingTrace | ExpertLoads:
    """Read any supported source (``IMPORT_FORMATS``) into a trace (what ``ds-grace import-trace`` saves).

    ``auto``: ``.json`` is OLMoE counts, a ``.jsonl`` starting with a ``{"type": "meta"}`` header a
    route log, any other ``.jsonl`` Mixtral records. Only route logs combine several files.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise TraceError("import needs at least one file")
    if source_format not in IMPORT_FORMATS:
        raise TraceError(f"format ({source_format!r}) must be one of {IMPORT_FORMATS}")
    for path in paths:
        if not path.is_file():
            raise TraceError(f"trace file ({path}) does not exist or is not a file")
    kinds = {_source_kind(path) if source_format == "auto" else source_format for path in paths}
    if len(kinds) != 1:
        raise TraceError(f"files {[str(p) for p in paths]} are of different formats ({sorted(kinds)})")
    kind = kinds.pop()
    if kind == "route-log":
        return load_route_logs(paths, num_experts=num_experts, keep_warmup=keep_warmup)
    if len(paths) != 1:
        raise TraceError(f"only route logs combine several files; {kind} takes one file, got {len(paths)}")
    if kind == "mixtral":
        return load_mixtral_jsonl(paths[0], num_experts=num_experts, token_identity=token_identity)
    return load_olmoe_counts(
        paths[0],
        num_experts=OLMOE_NUM_EXPERTS if num_experts is None else num_experts,
        top_k=8 if top_k is None else top_k,
    )


def _source_kind(path: Path) -> str:
    if path.suffix == ".json":
        return "olmoe-counts"
    if path.suffix == ".jsonl":
        return "route-log" if is_route_log(path) else "mixtral"
    raise TraceError(
        f"trace file ({path}): cannot tell its format from the suffix {path.suffix!r}; pass --format"
    )


def split_trace(trace: RoutingTrace, *, fraction: float) -> tuple[RoutingTrace, RoutingTrace]:
    """(first, rest): the first ``fraction`` of the tokens in recorded order, and the others.

    Tokens are ordered by token id (the importers number tokens in recorded order; without token ids
    row i is token i); the first round(fraction x tokens) of them go to `first`, in every layer, so a
    token is on one side at every layer. Both sides must keep at least one token in every layer.
    """
    if not isinstance(trace, RoutingTrace):
        raise TraceError("split_trace needs a per-token RoutingTrace, not expert loads")
    if not _is_number(fraction) or not 0.0 < fraction < 1.0:
        raise TraceError(f"fraction ({fraction!r}) must be a number in (0, 1)")
    tokens_N = np.unique(np.concatenate([trace.tokens_of(layer) for layer in range(trace.num_layers)]))
    cut = int(round(fraction * len(tokens_N)))
    if not 0 < cut < len(tokens_N):
        raise TraceError(f"fraction {fraction} of {len(tokens_N)} tokens leaves one side empty")
    boundary = tokens_N[cut]  # first token id of `rest`
    parts = []
    for name, side in (("first", True), ("rest", False)):
        ids, weights, tokens = [], [], []
        for layer in range(trace.num_layers):
            keep_T = (trace.tokens_of(layer) < boundary) == side
            if not keep_T.any():
                raise TraceError(f"split at fraction {fraction}: layer {layer} keeps no token in {name!r}")
            ids.append(trace.topk_ids[layer][keep_T])
            if trace.gate_weights is not None:
                weights.append(trace.gate_weights[layer][keep_T])
            if trace.token_ids is not None:
                tokens.append(trace.token_ids[layer][keep_T])
        parts.append(
            RoutingTrace(
                topk_ids=tuple(ids),
                num_experts=trace.num_experts,
                gate_weights=tuple(weights) if trace.gate_weights is not None else None,
                token_ids=tuple(tokens) if trace.token_ids is not None else None,
                metadata={
                    **trace.metadata,
                    "split": {
                        "of": trace.fingerprint,
                        "part": name,
                        "fraction": fraction,
                        "tokens": cut if side else len(tokens_N) - cut,
                    },
                },
            )
        )
    return parts[0], parts[1]


def _sample_topk(
    rng: np.random.Generator, logits_TE: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Gumbel-top-k: K distinct experts per token, in descending perturbed-logit order."""
    uniform = rng.random(logits_TE.shape, dtype=np.float32)
    perturbed_TE = logits_TE - np.log(-np.log(np.clip(uniform, 1e-12, 1.0 - 1e-7)))
    topk_TK = np.argpartition(perturbed_TE, -top_k, axis=1)[:, -top_k:]
    values_TK = np.take_along_axis(perturbed_TE, topk_TK, axis=1)
    order_TK = np.argsort(-values_TK, axis=1, kind="stable")
    topk_TK = np.take_along_axis(topk_TK, order_TK, axis=1)
    values_TK = np.take_along_axis(values_TK, order_TK, axis=1)
    weights_TK = np.exp(values_TK - values_TK[:, :1])
    return topk_TK, weights_TK / weights_TK.sum(axis=1, keepdims=True)


def _topics(
    rng: np.random.Generator, *, num_layers: int, num_tokens: int, num_clusters: int, layer_correlation: float
) -> np.ndarray:
    """topic_LT: each token's co-activation cluster per layer, kept across layers w.p. layer_correlation."""
    topic_LT = np.empty((num_layers, num_tokens), dtype=np.int64)
    topic_LT[0] = rng.integers(num_clusters, size=num_tokens)
    for layer in range(1, num_layers):
        keep_T = rng.random(num_tokens) < layer_correlation
        topic_LT[layer] = np.where(keep_T, topic_LT[layer - 1], rng.integers(num_clusters, size=num_tokens))
    return topic_LT


def _cluster_boost(
    rng: np.random.Generator, *, num_experts: int, num_clusters: int, strength: float
) -> np.ndarray:
    """boost_CE: logit added to expert e for tokens of topic c (experts split into random clusters)."""
    clusters = np.array_split(rng.permutation(num_experts), num_clusters)
    boost_CE = np.zeros((num_clusters, num_experts), dtype=np.float32)
    for cluster, members in enumerate(clusters):
        boost_CE[cluster, members] = strength
    return boost_CE


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise TraceError(f"{name} ({value}) must be in [0, 1]")


def synthetic(
    *,
    num_layers: int = 4,
    num_experts: int = 16,
    top_k: int = 2,
    num_tokens: int = 4096,
    skew: float = 1.0,
    co_activation: float = 0.5,
    num_clusters: int | None = None,
    layer_correlation: float = 0.5,
    seed: int = 0,
) -> RoutingTrace:
    """A synthetic per-token trace with tunable load skew and co-activation structure.

    - skew: expert popularity follows rank^-skew (0: uniform), shuffled per layer;
    - co_activation in [0, 1]: each token belongs to one of ``num_clusters`` topics (default E // 4,
      at least 2) and prefers that topic's experts with logit bonus 4 * co_activation;
    - layer_correlation in [0, 1]: probability a token keeps its topic from one layer to the next,
      which gives inter-layer affinity.
    Gate weights are the softmax of the chosen perturbed logits.
    """
    if not 1 <= top_k <= num_experts:
        raise TraceError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")
    if num_layers < 1 or num_tokens < 1:
        raise TraceError(f"num_layers ({num_layers}) and num_tokens ({num_tokens}) must be >= 1")
    if skew < 0:
        raise TraceError(f"skew ({skew}) must be >= 0")
    _check_unit("co_activation", co_activation)
    _check_unit("layer_correlation", layer_correlation)
    num_clusters = max(2, num_experts // 4) if num_clusters is None else num_clusters
    if not 1 <= num_clusters <= num_experts:
        raise TraceError(f"num_clusters ({num_clusters}) must be in [1, num_experts={num_experts}]")
    # structure (popularity order, clusters) and tokens draw from separate streams, so traces of
    # different lengths with one seed share their structure (held-out evaluation)
    structure_rng, rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    topic_LT = _topics(
        rng,
        num_layers=num_layers,
        num_tokens=num_tokens,
        num_clusters=num_clusters,
        layer_correlation=layer_correlation,
    )
    popularity_E = np.arange(1, num_experts + 1, dtype=np.float64) ** -skew
    topk_ids, gate_weights = [], []
    for layer in range(num_layers):
        order_E = structure_rng.permutation(num_experts)
        log_pop_E = np.log(popularity_E[order_E] / popularity_E.sum()).astype(np.float32)
        boost_CE = _cluster_boost(
            structure_rng, num_experts=num_experts, num_clusters=num_clusters, strength=4.0 * co_activation
        )
        ids_TK, weights_TK = _sample_topk(rng, log_pop_E[None, :] + boost_CE[topic_LT[layer]], top_k)
        topk_ids.append(ids_TK)
        gate_weights.append(weights_TK)
    return RoutingTrace(
        topk_ids=tuple(topk_ids),
        num_experts=num_experts,
        gate_weights=tuple(gate_weights),
        metadata={
            "format": "synthetic",
            "seed": seed,
            "skew": skew,
            "co_activation": co_activation,
            "num_clusters": num_clusters,
            "layer_correlation": layer_correlation,
        },
    )


def _integer_targets(loads_E: np.ndarray, total: int) -> np.ndarray:
    """Scale loads to integers summing to `total` (largest remainder, ties to the lower id)."""
    exact_E = loads_E / loads_E.sum() * total
    target_E = np.floor(exact_E).astype(np.int64)
    remainder = total - int(target_E.sum())
    order = np.lexsort((np.arange(len(loads_E)), -(exact_E - target_E)))
    target_E[order[:remainder]] += 1
    return target_E


def _repair_counts(rng: np.random.Generator, ids_TK: np.ndarray, target_E: np.ndarray) -> np.ndarray:
    """Swap experts inside tokens until every expert's count equals its target (keeps rows distinct)."""
    ids_TK = ids_TK.copy()
    num_experts = len(target_E)
    for _ in range(8 * num_experts + 16):
        delta_E = np.bincount(ids_TK.ravel(), minlength=num_experts) - target_E
        if not delta_E.any():
            return ids_TK
        progressed = False
        for surplus in np.flatnonzero(delta_E > 0):
            for deficit in np.flatnonzero(delta_E < 0)[np.argsort(delta_E[delta_E < 0], kind="stable")]:
                moves = min(delta_E[surplus], -delta_E[deficit])
                if moves <= 0:
                    continue
                has_deficit_T = (ids_TK == deficit).any(axis=1)
                rows, cols = np.nonzero((ids_TK == surplus) & ~has_deficit_T[:, None])
                if len(rows) == 0:
                    continue
                pick = rng.permutation(len(rows))[:moves]
                ids_TK[rows[pick], cols[pick]] = deficit
                delta_E[surplus] -= len(pick)
                delta_E[deficit] += len(pick)
                progressed = True
        if not progressed:
            break
    raise TraceError("could not match the target loads exactly; lower the skew or raise num_tokens")


def derive_trace_from_loads(
    loads: ExpertLoads | np.ndarray,
    *,
    num_tokens: int,
    top_k: int | None = None,
    co_activation: float = 0.5,
    num_clusters: int | None = None,
    layer_correlation: float = 0.5,
    seed: int = 0,
) -> RoutingTrace:
    """A synthetic per-token trace whose loads equal ``loads`` scaled to num_tokens x top_k tokens.

    For aggregate-only sources (e.g. the OLMoE expert counts), which hold no per-token
    co-activation. Per layer: scale the loads to integer targets (largest remainder); sample each
    token's top-k by Gumbel-top-k from logits log(load) + a topic-cluster bonus (as in
    ``synthetic``), with per-expert offsets calibrated on a sample so the draw lands near the
    targets; then swap experts inside tokens until every expert's count equals its target exactly.
    The loads are real; the co-activation structure is synthetic and says nothing about the model.
    """
    if isinstance(loads, ExpertLoads):
        loads_LE, top_k = loads.loads, top_k if top_k is not None else loads.top_k
        metadata = {"derived_from": dict(loads.metadata), "derived_from_fingerprint": loads.fingerprint}
    else:
        loads_LE, metadata = np.asarray(loads, dtype=np.float64), {}
        if loads_LE.ndim == 1:
            loads_LE = loads_LE[None, :]
    if top_k is None:
        raise TraceError("top_k is unknown for these loads; pass top_k")
    num_layers, num_experts = loads_LE.shape
    if not 1 <= top_k <= num_experts:
        raise TraceError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")
    if num_tokens < 1:
        raise TraceError(f"num_tokens ({num_tokens}) must be >= 1")
    _check_unit("co_activation", co_activation)
    _check_unit("layer_correlation", layer_correlation)
    num_clusters = max(2, num_experts // 4) if num_clusters is None else num_clusters
    rng = np.random.default_rng(seed)
    topic_LT = _topics(
        rng,
        num_layers=num_layers,
        num_tokens=num_tokens,
        num_clusters=num_clusters,
        layer_correlation=layer_correlation,
    )
    topk_ids = []
    for layer in range(num_layers):
        layer_loads = loads_LE[layer]
        if (layer_loads > 0).sum() < top_k:
            raise TraceError(f"loads[{layer}] has fewer than top_k ({top_k}) experts with load > 0")
        target_E = _integer_targets(layer_loads, num_tokens * top_k)
        if target_E.max() > num_tokens:
            raise TraceError(
                f"loads[{layer}]: expert {int(target_E.argmax())} would be chosen by {int(target_E.max())} of "
                f"{num_tokens} tokens; a top-k token chooses an expert at most once"
            )
        boost_CE = _cluster_boost(
            rng, num_experts=num_experts, num_clusters=num_clusters, strength=4.0 * co_activation
        )
        with np.errstate(divide="ignore"):
            logit_E = np.log(target_E / target_E.sum()).astype(np.float32)
        sample_T = topic_LT[layer][: min(num_tokens, 4096)]
        for _ in range(4):  # calibrate: top-k without replacement under-samples hot experts
            ids_TK, _ = _sample_topk(rng, logit_E[None, :] + boost_CE[sample_T], top_k)
            seen_E = np.bincount(ids_TK.ravel(), minlength=num_experts) + 0.5
            wanted_E = target_E / num_tokens * len(sample_T) + 0.5
            logit_E = np.where(target_E > 0, logit_E + np.log(wanted_E / seen_E), -np.inf).astype(np.float32)
        ids_TK, _ = _sample_topk(rng, logit_E[None, :] + boost_CE[topic_LT[layer]], top_k)
        topk_ids.append(_repair_counts(rng, ids_TK, target_E))
    return RoutingTrace(
        topk_ids=tuple(topk_ids),
        num_experts=num_experts,
        metadata={
            **metadata,
            "format": "derived_from_loads",
            "seed": seed,
            "co_activation": co_activation,
            "num_clusters": num_clusters,
            "layer_correlation": layer_correlation,
        },
    )
