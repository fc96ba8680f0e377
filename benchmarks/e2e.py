"""`ds-grace bench --e2e`: whole-model generation served by every system through ds_grace.init_inference.

Shape legend: B sequences on this rank, S prompt length, T tokens of one forward on this rank,
L MoE layers, K top-k, E experts, V vocabulary, N recorded tokens.

Two models, built from a seed at reduced width (transformers' own classes, real attention, norms,
embeddings, dense and shared-expert parts; nothing fetched):
- "e2e-mixtral": Mixtral-8x7B's shape, 32 MoE layers of 8 experts, top-2; MoE layer l replays the
  recorded routing of Mixtral's layer l (the Mixtral traces hold all 32 layers per token);
- "e2e-qwen15": Qwen1.5-MoE-A2.7B's MoE shape (60 experts, top-4, a gated shared expert), 5 MoE
  layers: layer i replays recorded layer (0, 8, 12, 18, 23)[i] of the real model's 24 (the only
  layers recorded; that line i of the five files is the same token is likely, not proven).
The routers are replaced by the replay (the gate's choice of the recorded token at that layer, with
its weights), so every system computes the same routes; everything else is the model's own.
Plans are fitted on the first half of each trace; the replayed tokens come from the second half:
token j of sequence s replays recorded token (s x (prompt + steps) + j) mod N.

Per system and repetition: a batch of B sequences per rank is prefilled (time to first token: the
prefill forward, barrier to slowest rank) and then decoded for DECODE_STEPS steps with the KV cache
(decode step: mean over the steps, each barrier to slowest rank; every sparse system is promised the
decode batch, so its decode steps take the low-latency path, as DeepEP's low-latency mode serves decode
in vLLM and SGLang). The tokens fed are the greedy
tokens of a single-process reference run of the same model and routing, so a lossless system's
greedy choice equals them: parity is max |logits - reference| over every step, and token parity.
Systems run interleaved: one warm-up generation each, then repetitions in an order shuffled per
repetition (seeded).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_grace.topology import Topology

E2E_SYSTEMS = ("vanilla_default", "vanilla_lossless", "peer_vllm", "peer_sglang", "grace")
DECODE_STEPS = 16
REPETITIONS = 3  # measured generations per system and run (after one warm-up each)
E2E_MARKERS = ("<!-- e2e-table:start -->", "<!-- e2e-table:end -->")


@dataclass(frozen=True)
class E2EModel:
    workload: str
    family: str
    trace_model: str  # benchmarks.workloads model whose trace halves are replayed
    trace_layers: tuple[int, ...]  # trace layer of each MoE layer (indices into the loaded trace)
    layer_label: str
    overrides: dict[str, Any]


E2E_MODELS: tuple[E2EModel, ...] = (
    E2EModel(
        "e2e-mixtral", "mixtral", "mixtral", tuple(range(32)),
        "32 MoE layers; layer l replays Mixtral-8x7B's layer l",
        {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 32, "num_attention_heads": 8,
         "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    E2EModel(
        "e2e-qwen15", "qwen2_moe", "qwen15", (0, 1, 2, 3, 4),
        "5 MoE layers; layer i replays Qwen1.5-MoE's recorded layer 0, 8, 12, 18, 23 (of 24)",
        {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
         "shared_expert_intermediate_size": 512, "num_hidden_layers": 5, "num_attention_heads": 8,
         "num_key_value_heads": 4, "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False},
    ),
)  # fmt: skip
E2E_BY_NAME = {m.workload: m for m in E2E_MODELS}


def aligned_replay(model: E2EModel, *, quick: bool = False) -> tuple[Any, np.ndarray, np.ndarray]:
    """(calibration trace of the model's layers, ids_NLK, weights_NLK): the second half's tokens that
    every replayed layer recorded, in token order (row n is one token at every layer)."""
    from benchmarks.workloads import calibration_and_replay, mixtral_halves

    if model.trace_model == "mixtral":
        calibration, replay = mixtral_halves()
    else:
        calibration, replay = calibration_and_replay(model.trace_model)
    layers = model.trace_layers[:2] if quick else model.trace_layers
    if replay.token_ids is None:  # rows are tokens in recorded order (line i of every layer's file)
        count = min(len(replay.topk_ids[layer]) for layer in layers)
        rows = [np.arange(count)] * len(layers)
    else:
        common = set(replay.token_ids[layers[0]].tolist())
        for layer in layers[1:]:
            common &= set(replay.token_ids[layer].tolist())
        tokens = np.array(sorted(common))
        rows = [np.searchsorted(replay.token_ids[layer], tokens) for layer in layers]
        for layer, row in zip(layers, rows, strict=True):
            if not np.array_equal(replay.token_ids[layer][row], tokens):
                raise ValueError(f"trace layer {layer}: token ids are not sorted; cannot align tokens")
    ids_NLK = np.stack([replay.topk_ids[layer][row] for layer, row in zip(layers, rows, strict=True)], axis=1)
    if replay.gate_weights is None:
        raise ValueError(f"the {model.trace_model} trace has no gate weights to replay")
    weights_NLK = np.stack(
        [replay.gate_weights[layer][row] for layer, row in zip(layers, rows, strict=True)], axis=1
    )
    from benchmarks.workloads import _select_layers

    return (
        _select_layers(calibration, tuple(layers)),
        ids_NLK.astype(np.int64),
        weights_NLK.astype(np.float32),
    )


def system_block(
    name: str, *, plan_path: Path | None, topology: Topology, timeout_s: float
) -> dict[str, Any]:
    """The grace block init_inference serves `name` with."""
    from benchmarks.systems import SYSTEM_BY_NAME

    system = SYSTEM_BY_NAME[name]
    shape = {"num_nodes": topology.num_nodes, "gpus_per_node": topology.gpus_per_node}
    if system.kind == "vanilla":
        vanilla = {"drop_tokens": system.drop_tokens, "eval_capacity_factor": 1.0, "min_capacity": 4}
        return {"enabled": False, "topology": shape, "vanilla": vanilla}
    block = system.grace_block(timeout_s=timeout_s)
    return {"enabled": True, "topology": shape, "plan": {"path": str(plan_path)}, **block}


def prepare_e2e(
    workdir: Path,
    *,
    topology: Topology,
    systems: Sequence[str],
    quick: bool,
    seed: int,
    order_seed: int,
    timeout_s: float,
    repetitions: int | None = None,
    trace_models: Sequence[str] = ("mixtral", "qwen15"),
) -> dict[str, Any]:
    """Checkpoints, plans and replayed routing into `workdir`; the e2e part of the worker spec (the
    models whose trace is among `trace_models`)."""
    from benchmarks.systems import SYSTEM_BY_NAME, build_plans, default_slots_per_gpu
    from ds_grace.models import tiny_checkpoint

    chosen = tuple(SYSTEM_BY_NAME[name] for name in systems)
    models = []
    for model in E2E_MODELS:
        if model.trace_model not in trace_models:
            continue
        calibration, ids_NLK, weights_NLK = aligned_replay(model, quick=quick)
        overrides = dict(model.overrides)
        if quick:
            overrides.update(num_hidden_layers=ids_NLK.shape[1], hidden_size=64, num_attention_heads=4,
                             num_key_value_heads=2)  # fmt: skip
        checkpoint = tiny_checkpoint(model.family, workdir / model.workload, seed=seed, **overrides)
        num_experts = calibration.num_experts
        slots = default_slots_per_gpu(num_experts, topology)
        plans = build_plans(calibration, topology, chosen, slots_per_gpu=slots)
        np.savez(workdir / f"{model.workload}.routing.npz", ids_NLK=ids_NLK, weights_NLK=weights_NLK)
        blocks = {}
        for system in chosen:
            plan_path = None
            if system.plan is not None:
                # the plan as the system serves it: its meta names the system's instance choice (the
                # SGLang-like peer serves the EPLB plan with GPU/node-first choice)
                plan = plans[system.plan]
                plan = replace(plan, meta={**plan.meta, "routing_policy": system.policy})
                plan_path = workdir / f"{model.workload}.{system.name}.plan.json"
                plan.save(plan_path)
            blocks[system.name] = system_block(system.name, plan_path=plan_path, topology=topology,
                                               timeout_s=timeout_s)  # fmt: skip
        models.append({
            "workload": model.workload, "checkpoint": str(checkpoint), "routing": str(workdir / f"{model.workload}.routing.npz"),
            "layer_label": model.layer_label, "blocks": blocks, "slots_per_gpu": slots, "num_experts": num_experts,
            "sequences": 1 if quick else 2, "prompt": 4 if quick else 16, "steps": 2 if quick else DECODE_STEPS,
            "repetitions": repetitions or (1 if quick else REPETITIONS), "overrides": overrides,
        })  # fmt: skip
    return {"models": models, "systems": list(systems), "order_seed": order_seed, "seed": seed}


# ---- on every rank ----


class ReplayRouting:
    """Stands in for a RoutedMoEBlock's adapter: the routing of each forward comes from the replay
    (this rank's rows of the current step), everything else from the family's adapter."""

    def __init__(self, adapter: Any, layer: int, source: ReplaySchedule) -> None:
        self._adapter = adapter
        self._layer = layer
        self._source = source

    def route_with_logits(self, block: Any, x_TD: torch.Tensor) -> Any:
        from ds_grace.models.routers import RouterOutput

        ids_TK, weights_TK = self._source.current(self._layer)
        if ids_TK.shape[0] != x_TD.shape[0]:
            raise ValueError(f"replay holds {ids_TK.shape[0]} tokens for a forward of {x_TD.shape[0]}")
        logits_TE = torch.zeros(x_TD.shape[0], self._source.num_experts, dtype=x_TD.dtype)
        return RouterOutput(logits_TE, ids_TK, weights_TK.to(x_TD.dtype))

    def route(self, block: Any, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.route_with_logits(block, x_TD)
        return output.topk_ids_TK, output.topk_weights_TK

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


class ReplaySchedule:
    """This rank's routing per forward: prefill rows (sequence-major), then one row per sequence per step."""

    def __init__(self, ids_NLK: np.ndarray, weights_NLK: np.ndarray, *, num_experts: int, sequences: list[int],
                 prompt: int, steps: int) -> None:  # fmt: skip
        self.num_experts = num_experts
        count = len(ids_NLK)
        span = prompt + steps
        token_SJ = (np.asarray(sequences)[:, None] * span + np.arange(span)[None, :]) % count
        self._ids_SJLK = torch.from_numpy(ids_NLK[token_SJ])
        self._weights_SJLK = torch.from_numpy(weights_NLK[token_SJ])
        self.prompt = prompt
        self._positions = slice(0, prompt)

    def set_step(self, step: int) -> None:
        """Step 0: the prefill; step i >= 1: decode step i."""
        self._positions = (
            slice(0, self.prompt) if step == 0 else slice(self.prompt + step - 1, self.prompt + step)
        )

    def current(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._ids_SJLK[:, self._positions, layer]
        weights = self._weights_SJLK[:, self._positions, layer]
        return ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, weights.shape[-1])


def install_replay(blocks: Sequence[Any], schedule: ReplaySchedule) -> None:
    for block in blocks:
        block.adapter = ReplayRouting(block.adapter, block.layer_index, schedule)


def promise_decode(served: Any, tokens: int | None) -> None:
    """Decode steps hold `tokens` tokens per rank: every sparse system takes its low-latency path on them
    (as DeepEP's low-latency mode serves decode in vLLM and SGLang); None: back to the normal paths."""
    for layer in served.layers:
        if hasattr(layer, "set_low_latency_tokens"):
            layer.set_low_latency_tokens(tokens)


def _generate(model: Any, schedule: ReplaySchedule, prompt_BS: torch.Tensor, fed_BI: torch.Tensor | None,
              *, steps: int, timed: bool, served: Any = None) -> tuple[list[float], list[torch.Tensor]]:  # fmt: skip
    """Prefill then `steps` decode steps with the KV cache; the decode inputs are fed_BI (the reference's
    greedy tokens), or the greedy tokens themselves when None. Returns per-forward seconds (barrier to
    this rank's finish) and each forward's last-position logits."""
    import torch.distributed as dist

    times, logits = [], []
    cache = None
    inputs = prompt_BS
    for step in range(steps + 1):
        schedule.set_step(step)
        if served is not None and step <= 1:
            promise_decode(served, None if step == 0 else int(prompt_BS.shape[0]))
        if timed:
            dist.barrier()
        start = time.perf_counter()
        out = model(input_ids=inputs, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        cache = out.past_key_values
        last = out.logits[:, -1, :].float()
        logits.append(last)
        token = last.argmax(dim=-1) if fed_BI is None else fed_BI[:, step]
        inputs = token[:, None]
    return times, logits


def run_e2e_on_rank(spec: dict[str, Any], *, rank: int, topology: Topology) -> dict[str, Any] | None:
    """Every model and system on this rank; rank 0 returns {workload: {"systems": summaries}}."""
    import ds_grace
    from ds_grace.models import convert_moe_blocks, load_checkpoint

    world = topology.world_size
    results: dict[str, Any] = {}
    rng = np.random.default_rng(int(spec["order_seed"]))
    for model_spec in spec["models"]:
        routing = np.load(model_spec["routing"])
        sequences = model_spec["sequences"]
        mine = list(range(rank * sequences, (rank + 1) * sequences))
        schedule = ReplaySchedule(routing["ids_NLK"], routing["weights_NLK"], num_experts=model_spec["num_experts"],
                                  sequences=mine, prompt=model_spec["prompt"], steps=model_spec["steps"])  # fmt: skip
        generator = torch.Generator().manual_seed(1000 + int(spec["seed"]))
        prompt_all = torch.randint(3, 128, (sequences * world, model_spec["prompt"]), generator=generator)
        prompt_BS = prompt_all[rank * sequences : (rank + 1) * sequences]
        reference = load_checkpoint(model_spec["checkpoint"])
        install_replay(convert_moe_blocks(reference), schedule)
        with torch.no_grad():
            _, reference_logits = _generate(
                reference, schedule, prompt_BS, None, steps=model_spec["steps"], timed=False
            )
        fed_BI = torch.stack([logit.argmax(dim=-1) for logit in reference_logits], dim=1)
        del reference
        engines = {}
        for name in spec["systems"]:
            engine = ds_grace.init_inference(
                model_spec["checkpoint"], config={"dtype": "fp32", "grace": model_spec["blocks"][name]}
            )
            install_replay(engine.grace.blocks, schedule)
            engines[name] = engine
        records: dict[str, dict[str, list[float]]] = {
            name: {"ttft_s": [], "decode_s": [], "max_abs_diff": [], "token_mismatch": [], "dropped": [],
                   "routes": [], "bytes_inter": [], "bytes_intra": []}
            for name in spec["systems"]
        }  # fmt: skip
        with torch.no_grad():
            for repetition in range(model_spec["repetitions"] + 1):
                names = list(spec["systems"])
                order = names if repetition == 0 else [names[i] for i in rng.permutation(len(names))]
                for name in order:
                    served = engines[name].grace
                    served.reset_counters()
                    times, logits = _generate(engines[name], schedule, prompt_BS, fed_BI, steps=model_spec["steps"],
                                              timed=True, served=served)  # fmt: skip
                    promise_decode(served, None)
                    if repetition == 0:  # warm-up
                        continue
                    record = records[name]
                    record["ttft_s"].append(times[0])
                    record["decode_s"].append(statistics.fmean(times[1:]))
                    record["max_abs_diff"].append(
                        max(float((a - b).abs().max()) for a, b in zip(logits, reference_logits))
                    )
                    greedy = torch.stack([logit.argmax(dim=-1) for logit in logits], dim=1)
                    record["token_mismatch"].append(float((greedy != fed_BI).sum()))
                    dropped, routes, inter, intra = _traffic(
                        served, tokens=sequences * (model_spec["prompt"] + model_spec["steps"]),
                        hidden=int(model_spec["overrides"]["hidden_size"]),
                    )  # fmt: skip
                    for key, value in (
                        ("dropped", dropped),
                        ("routes", routes),
                        ("bytes_inter", inter),
                        ("bytes_intra", intra),
                    ):
                        record[key].append(value)  # fmt: skip
        results[model_spec["workload"]] = _reduce(records, world=world)
        del engines
    return results if rank == 0 else None


def _traffic(served: Any, *, tokens: int, hidden: int) -> tuple[float, float, float, float]:
    """(dropped routes, routes, cross-node bytes, intra-node bytes) of this rank's last generation."""
    if served.mode == "grace":
        totals = [counters.total(include_sizes=True) for counters in served.counters]
        computed = sum(sum(counters.expert_rows) for counters in served.counters)
        routes = tokens * sum(block.top_k for block in served.blocks)
        return (float(routes - computed), float(routes), float(sum(t.bytes_sent_inter for t in totals)),
                float(sum(t.bytes_sent_intra for t in totals)))  # fmt: skip
    stats = served.stats()
    # vanilla: DeepSpeed's capacity-padded buffers, as benchmarks.runner counts them per forward
    from benchmarks.runner import vanilla_bytes

    inter = intra = 0.0
    num_experts = served.blocks[0].num_experts
    for layer_stats in served.dropped_routes.stats:
        for forward in layer_stats:
            a, b = vanilla_bytes(capacity=forward.capacity, num_experts=num_experts, hidden=hidden, itemsize=4,
                                 topology=served.topology)  # fmt: skip
            intra, inter = intra + a, inter + b
    return float(stats["dropped_routes"]), float(stats["routes"]), inter, intra


def _reduce(records: dict[str, dict[str, list[float]]], *, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    ops = {"ttft_s": dist.ReduceOp.MAX, "decode_s": dist.ReduceOp.MAX, "max_abs_diff": dist.ReduceOp.MAX}
    out = {}
    for name, record in records.items():
        reduced = {}
        for key, values in record.items():
            tensor = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(tensor, op=ops.get(key, dist.ReduceOp.SUM))
            reduced[key] = tensor.tolist()
        out[name] = {
            "ttft_ms": statistics.median(reduced["ttft_s"]) * 1e3,
            "decode_step_ms": statistics.median(reduced["decode_s"]) * 1e3,
            "per_repetition_ttft_ms": [t * 1e3 for t in reduced["ttft_s"]],
            "per_repetition_decode_step_ms": [t * 1e3 for t in reduced["decode_s"]],
            "max_abs_diff": max(reduced["max_abs_diff"]),
            "token_mismatches": int(sum(reduced["token_mismatch"])),
            "dropped_routes": int(sum(reduced["dropped"])), "routes": int(sum(reduced["routes"])),
            "bytes_cross_node": statistics.fmean(reduced["bytes_inter"]),
            "bytes_intra_node": statistics.fmean(reduced["bytes_intra"]),
        }  # fmt: skip
    return out


# ---- in the launching process ----


def build_e2e_rows(spec: dict[str, Any], setting: Any, results: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks.bench import PARITY_TOLERANCE
    from benchmarks.systems import SYSTEM_BY_NAME

    rows = []
    for model_spec in spec["models"]:
        systems = results[model_spec["workload"]]
        for name, measured in systems.items():
            system = SYSTEM_BY_NAME[name]
            rows.append({
                "workload": model_spec["workload"], "result_key": model_spec["workload"], "setting": setting.name,
                "system": name, "label": system.label, "group": system.group, "mode": setting.mode,
                "rate_mbit": setting.rate_mbit, "layers": model_spec["layer_label"],
                "slots_per_gpu": model_spec["slots_per_gpu"] if system.replicated else None,
                "order_seed": spec["order_seed"], "ttft_ms": measured["ttft_ms"],
                "decode_step_ms": measured["decode_step_ms"], "median_ms": measured["ttft_ms"],
                "p90_ms": max(measured["per_repetition_ttft_ms"]), "run_medians_ms": [measured["ttft_ms"]],
                "per_repetition_ttft_ms": measured["per_repetition_ttft_ms"],
                "per_repetition_decode_step_ms": measured["per_repetition_decode_step_ms"],
                "bytes_cross_node": measured["bytes_cross_node"], "bytes_intra_node": measured["bytes_intra_node"],
                "dropped_routes": measured["dropped_routes"], "routes": measured["routes"],
                "max_abs_diff": measured["max_abs_diff"], "token_mismatches": measured["token_mismatches"],
                "parity": measured["max_abs_diff"] <= PARITY_TOLERANCE * 100 and measured["token_mismatches"] == 0,
                "forwards": len(measured["per_repetition_ttft_ms"]),
            })  # fmt: skip
    add_e2e_ratios(rows)
    return rows


E2E_PARITY_NOTE = "parity: max |logits - reference| <= 1e-3 over every step and the same greedy tokens"


def add_e2e_ratios(rows: list[dict[str, Any]]) -> None:
    """Per workload and setting: each row's TTFT and decode-step speedups against DeepSpeed lossless and
    the best of the peers a user runs today."""
    from benchmarks.systems import BASELINE, NEW_PEERS

    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["setting"]), {})[row["system"]] = row
    for by_system in groups.values():
        base = by_system.get(BASELINE)
        for metric in ("ttft_ms", "decode_step_ms"):
            peers = {p: by_system[p][metric] for p in NEW_PEERS if p in by_system}
            best = min(peers, key=peers.__getitem__) if peers else None
            for row in by_system.values():
                row[f"{metric}_vs_vanilla_lossless"] = base[metric] / row[metric] if base else None
                row[f"{metric}_best_new_peer"] = best
                row[f"{metric}_vs_best_new_peer"] = peers[best] / row[metric] if best else None


def e2e_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """GRACE's time to first token against the best new peer (>= 1.0x) and DeepSpeed lossless (>= 3x at
    the slowest link), decode step reported; zero drops and parity in every lossless row."""
    rated = sorted({r["rate_mbit"] for r in rows if r["rate_mbit"] is not None})
    checks = []
    for row in rows:
        if row["system"] != "grace":
            continue
        lossless = [r for r in rows if r["workload"] == row["workload"] and r["setting"] == row["setting"]
                    and r["system"] != "vanilla_default"]  # fmt: skip
        slowest = bool(rated) and row["rate_mbit"] == rated[0]
        checks.append({
            "workload": row["workload"], "setting": row["setting"],
            "ttft_vs_best_new_peer": row["ttft_ms_vs_best_new_peer"], "best_new_peer": row["ttft_ms_best_new_peer"],
            "ttft_vs_best_new_peer_range": row.get("ttft_ms_vs_best_new_peer_range"),
            "ttft_vs_vanilla_lossless_range": row.get("ttft_ms_vs_vanilla_lossless_range"),
            "ttft_met": (row["ttft_ms_vs_best_new_peer"] or 0.0) >= 1.0,
            "ttft_vs_vanilla_lossless": row["ttft_ms_vs_vanilla_lossless"],
            "ttft_vs_vanilla_met": (row["ttft_ms_vs_vanilla_lossless"] or 0.0) >= 3.0 if slowest else None,
            "decode_vs_best_new_peer": row["decode_step_ms_vs_best_new_peer"],
            "decode_vs_vanilla_lossless": row["decode_step_ms_vs_vanilla_lossless"],
            "all_rows_lossless": all(r["dropped_routes"] == 0 and r["parity"] for r in lossless),
        })  # fmt: skip
    return {"system": "grace", "checks": checks}


def format_e2e_table(document: dict[str, Any]) -> str:
    head = ("| workload | setting | system | TTFT ms (runs min-max) | decode step ms (runs min-max) | TTFT vs lossless | "
            "TTFT vs best new peer | decode vs best new peer | cross-node MB / generation | dropped | parity |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in document["rows"]:

        def cell(metric: str, runs_key: str, row: dict[str, Any] = row) -> str:
            runs = row.get(runs_key) or []
            spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
            return f"{row[metric]:.1f}{spread}"

        def ratio(metric: str, row: dict[str, Any] = row) -> str:
            value, spread = row.get(metric), row.get(f"{metric}_range")
            if value is None:
                return ""
            return f"{value:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")

        lines.append(
            f"| {row['workload']} | {row['setting']} | {row['label']} | {cell('ttft_ms', 'run_ttft_ms')} | "
            f"{cell('decode_step_ms', 'run_decode_step_ms')} | {ratio('ttft_ms_vs_vanilla_lossless')} | "
            f"{ratio('ttft_ms_vs_best_new_peer')} | {ratio('decode_step_ms_vs_best_new_peer')} | "
            f"{row['bytes_cross_node'] / 1e6:.3f} | {row['dropped_routes']}/{row['routes']} | "
            f"{'yes' if row['parity'] else 'NO'} ({row['max_abs_diff']:.0e}) |"
        )
    return "\n".join(lines)


def run_e2e(
    *,
    rates: Sequence[float],
    mode: str,
    quick: bool,
    systems: Sequence[str],
    nodes: int,
    ranks_per_node: int,
    output: Path | None,
    timeout_s: float,
    seed: int,
    order_seed: int,
    quiet: bool,
    readme: bool,
    repetitions: int | None = None,
    models: Sequence[str] = ("mixtral", "qwen15"),
) -> dict[str, Any]:
    """The whole-model benchmark at every setting; returns (and writes) the JSON document."""
    from benchmarks.bench import environment, resolve_settings, run_setting, update_readme
    from ds_grace.files import write_text_atomic

    topology = Topology(nodes, ranks_per_node)
    names = list(systems) or list(E2E_SYSTEMS)
    if not any(m.trace_model in models for m in E2E_MODELS):
        raise ValueError(f"--e2e models ({list(models)}) must include mixtral or qwen15")
    settings = resolve_settings(mode, rates)
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="ds_grace_e2e_"))
    try:
        e2e = prepare_e2e(workdir, topology=topology, systems=names, quick=quick, seed=seed, order_seed=order_seed,
                          timeout_s=min(timeout_s, 300.0), repetitions=repetitions,
                          trace_models=models)  # fmt: skip
        spec = {"workdir": str(workdir), "topology": {"num_nodes": nodes, "gpus_per_node": ranks_per_node},
                "systems": names, "timeout_s": min(timeout_s, 300.0), "workloads": [], "e2e": e2e}  # fmt: skip
        write_text_atomic(workdir / "spec.json", json.dumps(spec, indent=1))
        rows: list[dict[str, Any]] = []
        runs = []
        for setting in settings:
            outcome = run_setting(
                setting, workdir=workdir, topology=topology, timeout_s=timeout_s, quiet=quiet
            )
            rows += build_e2e_rows(e2e, setting, outcome["results"])
            runs.append({"setting": setting.name, "mode": outcome["mode"], "wall_s": outcome["wall_s"]})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    document = {
        "benchmark": "ds-grace bench --e2e", "e2e": True, "topology": spec["topology"],
        "settings": [vars(s) for s in settings],
        "models": [{k: v for k, v in m.items() if k not in ("blocks", "checkpoint", "routing")} for m in e2e["models"]],
        "systems": names, "split": "plans fitted on the first half of each trace, the second half replayed",
        "parity": E2E_PARITY_NOTE, "order_seed": order_seed, "rows": rows, "target": e2e_check(rows),
        "cluster_runs": runs, "environment": environment(), "wall_s": time.time() - started, "quick": quick,
    }  # fmt: skip
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, json.dumps(document, indent=1))
        if readme:
            update_readme(format_e2e_table(document), markers=E2E_MARKERS)
    return document


if __name__ == "__main__":  # pragma: no cover - use `ds-grace bench --e2e`
    sys.exit("run `ds-grace bench --e2e` (benchmarks/bench.py --e2e)")
