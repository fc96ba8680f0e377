"""`ds-grace demo`: a small default of the benchmark, full GRACE vs the sparse peers and DeepSpeed-MoE.

On the emulated 2 nodes x 2 ranks (network namespaces, 50 Mbit/s between nodes) when run as root,
else on plain local ranks with the declared 2 x 2 topology. Replays real Qwen1.5-MoE and OLMoE
routing (prefill) through vanilla DeepSpeed-MoE (default and lossless), the vLLM- and SGLang-like
peers (global EPLB; even split and flat, or GPU/node-first copies and DeepEP-like dispatch) and full
GRACE, and prints the table: MoE-layer latency, speedup vs DeepSpeed lossless and vs the best peer, bytes across
nodes, dropped routes and parity with a single-process reference. Nothing is written unless
--output is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ds_grace.commands.bench import load_bench

DEMO_SYSTEMS = ["vanilla_default", "vanilla_lossless", "peer_vllm", "peer_sglang", "grace"]
DEMO_MODELS = ("qwen15", "olmoe-real")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=("auto", "netns", "local"),
        default="auto",
        help="netns: emulated nodes (root); local: plain local ranks; auto: netns when possible",
    )
    parser.add_argument("--rate-mbit", type=float, default=50.0, help="inter-node link rate (netns mode)")
    parser.add_argument("--steps", type=int, default=6, help="measured forwards per workload")
    parser.add_argument("--all-systems", action="store_true", help="also GRACE's ablation ladder")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON document here")
    parser.add_argument("--timeout-s", type=float, default=600.0)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    bench = load_bench()
    try:
        document = bench.run_bench(
            rates=[args.rate_mbit], mode=args.mode, models=DEMO_MODELS, phases=("prefill",), steps=args.steps,
            systems=[] if args.all_systems else DEMO_SYSTEMS, output=args.output, plots=False, readme=False,
            timeout_s=args.timeout_s, model_forward=False,
        )  # fmt: skip
    except (bench.BenchError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    bench.print_demo(document)
    return 0
