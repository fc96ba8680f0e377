"""A finished rank ends past the interpreter's teardown (ds_grace.comm.collectives.end_process): its atexit
handlers run and its buffered output is flushed, but nothing of the teardown itself runs (there, gloo's
threads can abort a rank whose work is done, and the launcher then fails the whole launch)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import atexit, sys

    class TornDown:
        def __del__(self):
            print("torn down", flush=True)

    kept = TornDown()  # a module global: collected only by the interpreter's teardown
    atexit.register(print, "atexit ran")
    print("buffered, not flushed")  # stdout is a pipe: block-buffered
    sys.stderr.write("stderr too")
    from ds_grace.comm.collectives import end_process

    end_process(int(sys.argv[1]))
    print("after end_process")
    """
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120)


def test_end_process_runs_atexit_flushes_and_skips_the_teardown():
    done = _run("3")
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines() == ["buffered, not flushed", "atexit ran"]
    assert "stderr too" in done.stderr
    assert "torn down" not in done.stdout  # a plain exit tears the module down and prints it


def test_the_script_tears_down_without_end_process():
    """The check above can fail: the same script ending with sys.exit prints what its teardown ran."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("end_process(int(sys.argv[1]))", "sys.exit(3)")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3
    assert "torn down" in done.stdout


def test_cli_looks_for_a_process_group_without_importing_torch():
    code = "import sys, ds_grace.cli as cli; print(cli.in_multi_rank_group(), 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def test_finish_rank_leaves_together_on_success_and_at_once_on_a_failure(monkeypatch):
    from ds_grace import cli
    from ds_grace.comm import collectives

    calls: list[tuple[str, int | None]] = []

    class Ended(Exception):
        pass

    def end_process(code: int) -> None:
        calls.append(("end_process", code))
        raise Ended

    def shutdown_distributed(exit_code: int | None = None) -> None:
        calls.append(("shutdown_distributed", exit_code))
        raise Ended

    monkeypatch.setattr(collectives, "end_process", end_process)
    monkeypatch.setattr(collectives, "shutdown_distributed", shutdown_distributed)
    monkeypatch.setattr(cli, "in_multi_rank_group", lambda: False)
    assert cli.finish_rank(2, failed=True) == 2 and cli.finish_rank(0) == 0
    assert calls == []  # a single process returns its code: nothing to leave
    monkeypatch.setattr(cli, "in_multi_rank_group", lambda: True)
    for code, failed, expected in ((0, False, ("shutdown_distributed", 0)), (2, True, ("end_process", 2))):
        calls.clear()
        try:
            cli.finish_rank(code, failed=failed)
        except Ended:
            pass
        assert calls == [expected]
