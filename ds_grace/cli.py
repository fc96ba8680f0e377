"""`ds-grace` command line. Each subcommand lives in ds_grace/commands/<name>.py with
``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when invoked.

Every failure caused by the input (bad arguments, a bad or missing file, a config, plan, trace or
checkpoint the project refuses, ranks that disagree) ends as one ``error: ...`` line on stderr and exit
code 2, without a traceback; a rank lost under a collective is one line naming it, exit code 1. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing

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
    "replay-drift": (
        "replay_drift",
        "replay served traffic unlike the profile through the planner and online re-planner (no ranks)",
    ),
    "report": ("report", "plots and a markdown summary of a plan on a routing trace"),
    "bench": ("bench", "GRACE ablations vs vanilla DeepSpeed-MoE on the emulated multi-node cluster"),
    "demo": (
        "demo",
        "small GRACE vs vanilla DeepSpeed-MoE comparison: latency, cross-node bytes, drops, parity",
    ),
}


# the project's errors for refused input, by qualified class name (matched over each error's bases, so
# that reporting one needs no import of the module that defines it)
INPUT_ERRORS = frozenset(
    {
        "ds_grace.config.GraceConfigError",
        "ds_grace.planning.plan.PlanError",
        "ds_grace.planning.grouping.GroupingError",
        "ds_grace.planning.replication.ReplicationError",
        "ds_grace.trace.TraceError",
        "ds_grace.models.adapters.ModelAdapterError",
        "ds_grace.comm.collectives.DistributedSetupError",
        "ds_grace.comm.deepspeed_groups.ExpertGroupError",
        "ds_grace.comm.migration.PlanMismatchError",
        "ds_grace.files.FileWriteError",
    }
)
EXIT_INPUT_ERROR = 2
EXIT_LOST_RANK = 1


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one `error: ...` line (and `--help` for the usage)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_INPUT_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def is_project_error(exc: BaseException) -> bool:
    return bool({f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__} & INPUT_ERRORS)


def is_input_error(exc: BaseException) -> bool:
    """True for the project's errors about its input, and for file errors naming a file."""
    file_errors = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
    return is_project_error(exc) or (isinstance(exc, file_errors) and exc.filename is not None)


def error_line(exc: BaseException) -> str:
    """The one line an input error is reported as."""
    if isinstance(exc, OSError) and not is_project_error(exc) and exc.filename is not None:
        return f"error: {exc.filename}: {exc.strerror}"
    return f"error: {' '.join(str(exc).split()) or type(exc).__name__}"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the `selected` subcommand's module is imported for its arguments."""
    parser = _Parser(
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


# commands that import DeepSpeed (or start ranks that do): its accelerator is named before the import
DEEPSPEED_COMMANDS = frozenset(
    {"cluster", "check-config", "baseline", "selfcheck", "profile", "bench", "demo"}
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(selected).parse_args(argv)  # --help and usage errors end here, before torch
    if selected in DEEPSPEED_COMMANDS:
        from ds_grace.log import quiet_deepspeed_accelerator

        quiet_deepspeed_accelerator()
    try:
        code = int(importlib.import_module(f"ds_grace.commands.{args._module}").run(args) or 0)
    except Exception as exc:  # noqa: BLE001 - input errors and lost ranks become one line, bugs re-raise
        return finish_rank(exit_code_for(exc), failed=True)
    return finish_rank(code)  # a rank of a launch (ds-grace profile) ends here


def finish_rank(code: int, *, failed: bool = False) -> int:
    """How a command ends. In a rank of a multi-rank group the process ends here with `code`, past the
    interpreter's teardown (``end_process``): after leaving the group together (barrier, destroy), or at
    once when `failed` (one rank's error: the others may never reach the barrier). Elsewhere returns
    `code`."""
    if in_multi_rank_group():
        from ds_grace.comm.collectives import end_process, shutdown_distributed

        if failed:
            end_process(code)
        shutdown_distributed(exit_code=code)
    return code


def in_multi_rank_group() -> bool:
    """True in a rank of a launch whose process group is up (never imports torch itself)."""
    if "torch.distributed" not in sys.modules:
        return False
    from ds_grace.comm.collectives import world

    return world()[0] > 1


def exit_code_for(exc: Exception) -> int:
    """Report `exc` as one line and return its exit code (input errors), or leave the process at once
    (a lost rank: with a broken process group the interpreter's teardown would abort in gloo's threads);
    anything else is re-raised with its traceback. Call it from an `except` block."""
    code = report_failure(exc)
    if code is None:
        raise exc
    if code == EXIT_LOST_RANK:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def report_failure(exc: BaseException) -> int | None:
    """Print the one `error: ...` line of an input error or of a lost rank and return the exit code;
    None for anything else (a bug: the caller re-raises it)."""
    if is_input_error(exc):
        print(error_line(exc), file=sys.stderr)
        return EXIT_INPUT_ERROR
    collectives = sys.modules.get("ds_grace.comm.collectives")  # loaded by any command that communicates
    report = collectives.lost_rank_report(exc) if collectives is not None else None
    if report is not None:
        print(f"error: {report}", file=sys.stderr)
        return EXIT_LOST_RANK
    return None


if __name__ == "__main__":
    sys.exit(main())
