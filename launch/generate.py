"""Batched greedy generation with ds_grace.init_inference: prefill, then decode with a KV cache.

Shape legend: B prompts on this rank, L prompt length (left-padded), N new tokens, V vocabulary.

One node, no ssh (each node of a cluster runs this line with its own --node_rank):

    deepspeed --hostfile launch/hostfile.example --no_ssh --node_rank 0 --master_addr 127.0.0.1 \\
        launch/generate.py --model DIR --ds-config ds_configs/grace.json \\
        --prompt "The capital of France" --prompt "MoE layers" --max-new-tokens 16

Real clusters, ssh form (run once, on the first host):

    deepspeed --hostfile HOSTFILE --master_addr FIRST_HOST launch/generate.py --model DIR ...

The ds_config's "grace" block selects GRACE-MoE; with the block absent or "enabled": false the same
line serves vanilla DeepSpeed-MoE, which is how the two are compared. --compare-vanilla does both in one
launch: GRACE first (its results printed before vanilla starts), then vanilla DeepSpeed-MoE (the block's
grace.vanilla settings), with the speedups; when vanilla refuses the set-up (e.g. experts that do not divide
over the ranks) the last line says why and GRACE's results stand. Latencies are the median (and range) of
--repeats timed generations after --warmup untimed ones, speedups the ratio of the medians. Prompts are dealt to ranks in
contiguous shares of ceil(P / world size); a short share is filled with copies of the first prompt
(computed, not reported) so that every rank runs the same batch shape and the same number of steps.
All prompts are left-padded to the longest. Greedy decoding runs exactly --max-new-tokens steps on
every rank (MoE layers communicate, so no rank may stop early); each printed continuation is cut after
its first end-of-sequence token. Rank 0 prints each prompt's continuation (text, or token ids when the
checkpoint has no tokenizer and the byte-level fallback cannot decode) and the latency per phase, the
slowest rank's: prefill ms and decode ms per token. --json prints one JSON object instead.

Every rank must be launched with the same prompts and generation settings: they join the start-up
fingerprint (launch.*), and a node launched otherwise stops every rank naming the field. Refused input is
one `error:` line and exit code 2 (with the rank and host under a launcher of several ranks); a rank that
fails before the start-up handshake publishes its error, and the other ranks stop naming it.

--plan PLAN sets grace.plan.path (the shipped ds_configs/grace.json leaves it unset).
Topology: grace.topology in the config, "auto" taking the launcher's nodes and ranks per node;
--nodes/--gpus-per-node override it, and so do DS_GRACE_NUM_NODES / DS_GRACE_GPUS_PER_NODE, which
ds_grace/cluster/emulated_cluster.py declares in its local-ranks mode.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402 - after the path set-up above

from ds_grace.log import quiet_deepspeed_accelerator  # noqa: E402

quiet_deepspeed_accelerator()  # before DeepSpeed is imported: no accelerator warning on every rank

from ds_grace.comm.collectives import barrier, gather_objects_to_rank0, max_over_ranks, world  # noqa: E402
from ds_grace.serving_comparison import Timing, comparison_line, speedup, timed_repeats, unless_refused  # noqa: E402

ENV_NUM_NODES = "DS_GRACE_NUM_NODES"
ENV_GPUS_PER_NODE = "DS_GRACE_GPUS_PER_NODE"
EXIT_INPUT_ERROR = 2


class LaunchInputError(ValueError):
    """A refused argument, environment variable or prompt of this script: one `error:` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are raised (and so published to the other ranks), not printed here."""

    def error(self, message: str) -> typing.NoReturn:
        raise LaunchInputError(f"{self.prog}: {message} (see {self.prog} --help)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    parser.add_argument("--ds-config", required=True, help="ds_config.json, with or without a grace block")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    parser.add_argument("--plan", default=None, help="override grace.plan.path (a `ds-grace plan` file)")
    parser.add_argument("--nodes", type=int, default=None, help="override grace.topology.num_nodes")
    parser.add_argument(
        "--gpus-per-node", type=int, default=None, help="override grace.topology.gpus_per_node"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed 2-token generations first (default 1)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed generations; latencies are their median (default 3)"
    )
    parser.add_argument(
        "--compare-vanilla",
        action="store_true",
        help="then serve vanilla DeepSpeed-MoE and compare (grace only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (rank 0)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens ({args.max_new_tokens}) must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup ({args.warmup}) must be >= 0")
    if args.repeats < 1:
        parser.error(f"--repeats ({args.repeats}) must be >= 1")
    if any(not prompt for prompt in args.prompt):
        parser.error("--prompt must not be empty")
    return args


def load_config(
    path: str, *, nodes: int | None, gpus_per_node: int | None, plan: str | None = None
) -> dict[str, Any]:
    """The ds_config with the plan and topology overrides applied to its grace block (if it has one)."""
    from ds_grace.config import load_ds_config

    load_ds_config(path)  # a missing, unreadable or malformed file, or a bad grace block: one clear error
    config = json.loads(Path(path).read_text())
    if plan is not None:
        grace = config.get("grace")
        if not isinstance(grace, dict) or grace.get("enabled") is False:
            raise LaunchInputError(
                f"--plan ({plan}) needs a ds_config with an enabled grace block; {path} serves vanilla "
                "DeepSpeed-MoE"
            )
        config["grace"] = {**grace, "plan": {**grace.get("plan", {}), "path": plan}}
    nodes = nodes if nodes is not None else _env_int(ENV_NUM_NODES)
    gpus_per_node = gpus_per_node if gpus_per_node is not None else _env_int(ENV_GPUS_PER_NODE)
    grace = config.get("grace")
    if isinstance(grace, dict) and (nodes is not None or gpus_per_node is not None):
        topology = dict(grace.get("topology", {}))
        if nodes is not None:
            topology["num_nodes"] = nodes
        if gpus_per_node is not None:
            topology["gpus_per_node"] = gpus_per_node
        config["grace"] = {**grace, "topology": topology}
    return config


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise LaunchInputError(f"environment variable {name} ({text!r}) must be a positive integer")
    return int(text)


def deal_prompts(num_prompts: int, *, world_size: int, rank: int) -> list[int | None]:
    """Prompt index per batch row of `rank` (None: a filler row); every rank gets ceil(P / world) rows."""
    share = math.ceil(num_prompts / world_size)
    mine: list[int | None] = list(range(rank * share, min((rank + 1) * share, num_prompts)))
    return mine + [None] * (share - len(mine))


def left_pad(rows: Sequence[Sequence[int]], *, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids_BL, attention_mask_BL) with every row right-aligned in `width` columns."""
    input_ids_BL = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask_BL = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids_BL[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask_BL[row, width - len(ids) :] = 1
    return input_ids_BL, attention_mask_BL


def _sync() -> None:
    barrier()


def greedy_generate(
    model: Any, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, *, max_new_tokens: int
) -> tuple[torch.Tensor, float, list[float]]:
    """Greedy decoding for exactly max_new_tokens steps: returns (new_ids_BN, prefill_ms, decode_ms per step).

    Position ids follow transformers' generate for left padding (cumulative mask, padding at 0)."""
    position_ids_BL = (attention_mask_BL.cumsum(dim=-1) - 1).masked_fill(attention_mask_BL == 0, 0)
    new_ids: list[torch.Tensor] = []
    with torch.no_grad():
        _sync()
        start = time.perf_counter()
        out = model(
            input_ids=input_ids_BL,
            attention_mask=attention_mask_BL,
            position_ids=position_ids_BL,
            use_cache=True,
        )
        next_B = out.logits[:, -1, :].argmax(dim=-1)
        prefill_ms = (time.perf_counter() - start) * 1e3
        new_ids.append(next_B)
        mask_BL, position_B1 = attention_mask_BL, position_ids_BL[:, -1:]
        decode_ms = []
        for _ in range(max_new_tokens - 1):
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones(mask_BL.shape[0], 1)], dim=1)
            position_B1 = position_B1 + 1
            start = time.perf_counter()
            out = model(
                input_ids=next_B[:, None],
                attention_mask=mask_BL,
                position_ids=position_B1,
                cache=out.cache,
                use_cache=True,
            )
            next_B = out.logits[:, -1, :].argmax(dim=-1)
            decode_ms.append((time.perf_counter() - start) * 1e3)
            new_ids.append(next_B)
    return torch.stack(new_ids, dim=1), prefill_ms, decode_ms


def cut_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """`ids` up to and including the first end-of-sequence id."""
    out = []
    for token in ids:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def serve_and_generate(
    args: argparse.Namespace, config: dict[str, Any], prompt_ids: list[list[int]], tokenizer: Any
) -> dict[str, Any] | None:
    """Serve the model with `config`, generate, and return the report on rank 0 (None elsewhere)."""
    import ds_grace
    from ds_grace.profiling import special_token_ids

    engine = ds_grace.init_inference(args.model, config=config, agree_on=getattr(args, "launch_fields", None))
    served = engine.grace
    world_size, rank = world()
    model_config = engine.module.config
    pad_id = model_config.pad_token_id if isinstance(model_config.pad_token_id, int) else 0
    eos = model_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])

    rows = deal_prompts(len(prompt_ids), world_size=world_size, rank=rank)
    width = max(len(ids) for ids in prompt_ids)
    batch = [prompt_ids[i if i is not None else 0] for i in rows]
    input_ids_BL, attention_mask_BL = left_pad(batch, width=width, pad_id=pad_id)
    for _ in range(args.warmup):
        greedy_generate(engine, input_ids_BL, attention_mask_BL, max_new_tokens=2)
    generated: list[torch.Tensor] = []

    def timed_run() -> tuple[float, float]:
        served.reset_counters()  # the stats reported are the last run's
        new_ids_BN, prefill_ms, decode_ms = greedy_generate(
            engine, input_ids_BL, attention_mask_BL, max_new_tokens=args.max_new_tokens
        )
        generated.append(new_ids_BN)
        return max_over_ranks(prefill_ms), max_over_ranks(
            sum(decode_ms) / len(decode_ms)
        ) if decode_ms else 0.0

    prefill, decode = timed_repeats(timed_run, repeats=args.repeats)
    new_ids_BN = generated[0]
    mine = [(i, new_ids_BN[row].tolist()) for row, i in enumerate(rows) if i is not None]
    gathered = gather_objects_to_rank0({"continuations": mine, "stats": served.stats()})
    if rank != 0:
        return None

    continuations = dict(item for part in gathered for item in part["continuations"])
    stats: dict[str, int] = {}
    for part in gathered:
        for name, value in part["stats"].items():
            stats[name] = stats.get(name, 0) + value
    special = special_token_ids(model_config)
    results = []
    for index, prompt in enumerate(args.prompt):
        new_ids = cut_at_eos(continuations[index], eos_ids)
        results.append(
            {
                "prompt": prompt,
                "prompt_ids": prompt_ids[index],
                "new_token_ids": new_ids,
                "text": tokenizer.decode([t for t in new_ids if t not in special]),
            }
        )
    return {
        "mode": served.mode,
        "family": served.family,
        "world_size": world_size,
        "topology": {"num_nodes": served.topology.num_nodes, "gpus_per_node": served.topology.gpus_per_node},
        "max_new_tokens": args.max_new_tokens,
        "prefill_ms": prefill.median,
        "decode_ms_per_token": decode.median,
        "prefill_ms_runs": prefill.as_dict(),
        "decode_ms_per_token_runs": decode.as_dict(),
        "moe_stats": stats,
        "results": results,
    }


def vanilla_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same ds_config serving vanilla DeepSpeed-MoE (its grace.vanilla settings kept)."""
    grace = config.get("grace") if isinstance(config.get("grace"), dict) else {}
    return {**config, "grace": {"enabled": False, "vanilla": grace.get("vanilla", {})}}


def add_comparison(
    report: dict[str, Any], baseline: dict[str, Any] | None, *, refused: str | None, repeats: int
) -> None:
    """Put vanilla's report (or why it was refused), the speedups and the token check into `report`."""
    report["repeats"] = repeats
    if refused is not None or baseline is None:
        report["vanilla_refused"] = refused
        return
    report["vanilla"] = baseline
    report["speedup"] = {
        phase: speedup(Timing(tuple(baseline[key]["samples"])), Timing(tuple(report[key]["samples"])))
        for phase, key in (("prefill", "prefill_ms_runs"), ("decode", "decode_ms_per_token_runs"))
    }
    report["same_tokens"] = [r["new_token_ids"] for r in report["results"]] == [
        r["new_token_ids"] for r in baseline["results"]
    ]


def print_report(report: dict[str, Any]) -> None:
    topology = report["topology"]
    print(
        f"{report['mode']} ({report['family']}) on {topology['num_nodes']} nodes x "
        f"{topology['gpus_per_node']} ranks, {report['world_size']} ranks"
    )
    for result in report["results"]:
        shown = result["text"] if result["text"] is not None else f"token ids {result['new_token_ids']}"
        print(f"--- {result['prompt']!r}\n{shown}")
    prefill, decode = report["prefill_ms_runs"], report["decode_ms_per_token_runs"]
    print(
        f"prefill {prefill['median']:.1f} ms ({prefill['min']:.1f}-{prefill['max']:.1f}), decode "
        f"{decode['median']:.2f} ms/token ({decode['min']:.2f}-{decode['max']:.2f}): median (range) of "
        f"{len(prefill['samples'])} runs, slowest rank"
    )
    print("MoE " + ", ".join(f"{name} {value}" for name, value in sorted(report["moe_stats"].items())))


def launch_fields(
    args: argparse.Namespace, prompt_ids: list[list[int]], *, world_size: int
) -> dict[str, Any]:
    """What every rank must be launched with the same of (joins the start-up fingerprint): each prompt
    and its token count, the batch shape, new tokens, warm-up and sampling."""
    fields: dict[str, Any] = {"num_prompts": len(args.prompt)}
    for index, (prompt, ids) in enumerate(zip(args.prompt, prompt_ids)):
        fields[f"prompt[{index}]"] = prompt
        fields[f"prompt[{index}].tokens"] = len(ids)
    fields["batch_shape"] = [math.ceil(len(prompt_ids) / world_size), max(len(ids) for ids in prompt_ids)]
    fields["max_new_tokens"] = args.max_new_tokens
    fields["warmup"] = args.warmup
    fields["sampling"] = "greedy"
    fields["compare_vanilla"] = args.compare_vanilla
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from ds_grace.models.describe import check_checkpoint_folder
    from ds_grace.preflight import world_from_env
    from ds_grace.profiling import load_text_tokenizer

    check_checkpoint_folder(args.model)  # a missing folder or a broken config.json is named first
    tokenizer = load_text_tokenizer(args.model)
    prompt_ids = [tokenizer.encode(prompt) for prompt in args.prompt]
    empty = [prompt for prompt, ids in zip(args.prompt, prompt_ids) if not ids]
    if empty:
        raise LaunchInputError(f"--prompt ({empty[0]!r}) encodes to no token: give it some text")
    config = load_config(args.ds_config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, plan=args.plan)
    args.launch_fields = launch_fields(args, prompt_ids, world_size=world_from_env()[0])
    report = serve_and_generate(args, config, prompt_ids, tokenizer)
    if report is not None and not args.json:
        print_report(report)  # GRACE's results stand whatever happens to the comparison
        sys.stdout.flush()
    if args.compare_vanilla:
        if report is not None and report["mode"] == "vanilla":
            raise LaunchInputError("--compare-vanilla needs a ds_config whose grace block is enabled")
        gc.collect()
        baseline, refused = unless_refused(
            lambda: serve_and_generate(args, vanilla_config(config), prompt_ids, tokenizer)
        )
        if report is not None:
            add_comparison(report, baseline, refused=refused, repeats=args.repeats)
    if report is None:
        return 0
    if args.json:
        print(json.dumps(report), flush=True)
        return 0
    if "vanilla" in report:
        print_report(report["vanilla"])
    if args.compare_vanilla:
        print(comparison_line(report))
    sys.stdout.flush()
    return 0


def _error_prefix() -> str:
    """ "rank R (host H): " under a launcher of several ranks (every rank prints its own line), else ""."""
    import socket

    rank, world_size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
    if rank is None or world_size in ("", "1"):
        return ""
    return f"rank {rank} (host {socket.gethostname()}): "


def run(argv: Sequence[str] | None = None) -> int:
    """main() with its failures reported: before the start-up handshake a failure is published to the
    other ranks (ds_grace.comm.rendezvous), which stop within seconds naming this rank; an input error is
    one `error:` line and exit code 2, a lost rank one line and exit code 1; a bug keeps its traceback."""
    from ds_grace.cli import finish_rank, is_input_error
    from ds_grace.comm.collectives import lost_rank_report, shutdown_distributed
    from ds_grace.comm.rendezvous import join_startup

    startup = None
    try:
        startup = join_startup()
        code = main(argv)
    except Exception as exc:  # noqa: BLE001 - reported below; bugs re-raise
        input_error = is_input_error(exc) or isinstance(exc, LaunchInputError)
        if startup is not None and not startup.closed:
            startup.fail(exc, input_error=input_error)
            startup.leave()
        text = " ".join(str(exc).split()) or type(exc).__name__
        if input_error:
            if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
                text = f"{exc.filename}: {exc.strerror}"
            print(f"error: {_error_prefix()}{text}", file=sys.stderr, flush=True)
            return finish_rank(EXIT_INPUT_ERROR, failed=True)
        report = lost_rank_report(exc)
        if report is None:
            raise
        print(f"error: {_error_prefix()}{report}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # with a broken process group the interpreter's teardown would abort in gloo's threads
    finish_rank(code)  # a rank of a multi-rank group ends here, past the interpreter's teardown
    shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(run())
