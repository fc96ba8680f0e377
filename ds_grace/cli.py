"""`ds-grace` command line. Each subcommand lives in ds_grace/commands/<name>.py with
``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when invoked."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module under ds_grace.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "cluster": ("cluster", "run a script on an emulated multi-node cluster (netns + tc) or on local ranks"),
    "check-config": ("check_config", "validate a ds_config.json and print the resolved grace block"),
    "baseline": ("baseline", "run vanilla DeepSpeed-MoE inference on local ranks and print its table"),
    "selfcheck": ("selfcheck", "check GRACE's runtime for lossless parity on local gloo ranks"),
    "tiny-checkpoint": ("tiny_checkpoint", "write a small random checkpoint of a supported model family"),
    "profile": ("profile", "record MoE routing of a checkpoint on calibration text into a trace"),
    "import-trace": (
        "import_trace",
        "read real routing data (Mixtral JSONL, OLMoE counts, route logs) into a .npz",
    ),
    "split-trace": ("split_trace", "split a per-token trace into the first F of its tokens and the rest"),
    "plan": ("plan", "build a GRACE (or baseline) expert placement plan from a routing trace"),
    "evaluate": ("evaluate", "metrics of a plan on a routing trace (cross-node copies, balance)"),
    "report": ("report", "plots and a markdown summary of a plan on a routing trace"),
    "bench": ("bench", "GRACE ablations vs vanilla DeepSpeed-MoE on the emulated multi-node cluster"),
    "demo": (
        "demo",
        "small GRACE vs vanilla DeepSpeed-MoE comparison: latency, cross-node bytes, drops, parity",
    ),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the `selected` subcommand's module is imported for its arguments."""
    parser = argparse.ArgumentParser(
        prog="ds-grace",
        description="GRACE-MoE for DeepSpeed-MoE: plan, check and run locality-aware MoE inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        if name == selected:
            importlib.import_module(f"ds_grace.commands.{module}").add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(selected).parse_args(argv)
    return int(importlib.import_module(f"ds_grace.commands.{args._module}").run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
