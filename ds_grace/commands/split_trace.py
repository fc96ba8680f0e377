"""`ds-grace split-trace`: split a per-token trace into a fitting part and a held-out part.

    ds-grace split-trace TRACE --fraction F --out A B

A gets the first F of the tokens in recorded order, B the rest; a token is on the same side at every
layer (see ds_grace.trace.split_trace). Plan on A, score the plan on B with `ds-grace evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ds_grace.trace import RoutingTrace, TraceError, split_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="per-token trace (.npz from import-trace or profile)")
    parser.add_argument("--fraction", type=float, required=True, help="share of tokens for A, in (0, 1)")
    parser.add_argument("--out", nargs=2, required=True, metavar=("A", "B"), help="the two trace files")


def run(args: argparse.Namespace) -> int:
    try:
        first, rest = split_trace(RoutingTrace.load(args.trace), fraction=args.fraction)
        first.save(args.out[0])
        rest.save(args.out[1])
    except (TraceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "out": list(args.out),
                "tokens": [first.metadata["split"]["tokens"], rest.metadata["split"]["tokens"]],
                "rows_per_layer": [list(first.num_tokens), list(rest.num_tokens)],
            }
        )
    )
    return 0
