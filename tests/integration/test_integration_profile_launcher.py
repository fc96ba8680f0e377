"""`ds-grace profile` under the real deepspeed launcher serves the checkpoint sharded (contiguous experts,
each rank holding only its share) and records every rank's routing: on a model that fits in one process,
the gathered trace equals the single-process profile, token for token (rank 0's sequences first). The
ranks end past the interpreter's teardown (ds_grace.comm.collectives.end_process), the launcher's own
processes through it: a sitecustomize on the path reports every teardown with its process id.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ds_grace.cli import main as cli_main
from ds_grace.cluster.node_launchers import free_port
from ds_grace.models import tiny_checkpoint
from ds_grace.profiling import load_text_tokenizer
from ds_grace.trace import load_trace

REPO_ROOT = Path(__file__).resolve().parents[2]
RANKS = 2
SEQ_LEN = 24
TEXT = "Experts that tokens choose together share a GPU; hot experts get replicas on other nodes. " * 3
# a module global of every process on this path: collected by the interpreter's teardown, which it reports
TEARDOWN_REPORTER = """
import os


class _Reporter:
    def __del__(self):
        os.write(2, f"interpreter torn down in process {os.getpid()}\\n".encode())


_reporter = _Reporter()
"""


def _sequence_rows(num_tokens: int, world_size: int) -> list[int]:
    """Single-process token rows in the order the launched profile gathers them (rank-major)."""
    starts = list(range(0, num_tokens, SEQ_LEN))
    rows = []
    for rank in range(world_size):
        for start in starts[rank::world_size]:
            rows.extend(range(start, min(start + SEQ_LEN, num_tokens)))
    return rows


@pytest.mark.multirank
def test_profile_under_the_launcher_equals_single_process(tmp_path):
    launcher = shutil.which("deepspeed")
    assert launcher is not None, "the deepspeed launcher is not on PATH"
    model = tiny_checkpoint("olmoe", tmp_path / "olmoe", seed=12)
    data = tmp_path / "calibration.txt"
    data.write_text(TEXT)
    num_tokens = len(load_text_tokenizer(model).encode(TEXT))
    common = ["profile", "--model", str(model), "--data", str(data), "--tokens", str(num_tokens)]
    common += ["--seq-len", str(SEQ_LEN), "--batch-size", "2", "--no-progress", "--json"]
    assert cli_main([*common, "--out", str(tmp_path / "single.npz")]) == 0
    command = [
        launcher,
        "--num_gpus",
        str(RANKS),
        "--master_port",
        str(free_port()),
        "--no_local_rank",
        "--module",
    ]
    command += ["ds_grace.cli", *common, "--out", str(tmp_path / "launched.npz")]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(TEARDOWN_REPORTER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{site}{os.pathsep}{REPO_ROOT}"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"ranks": 2' in done.stdout
    output = done.stdout + done.stderr
    ranks = set(re.findall(r"process (\d+) spawned with command", output))
    torn_down = set(re.findall(r"interpreter torn down in process (\d+)", output))
    assert len(ranks) == RANKS and torn_down, output[-3000:]  # the launcher's processes were torn down
    assert not ranks & torn_down, output[-3000:]
    single, launched = load_trace(tmp_path / "single.npz"), load_trace(tmp_path / "launched.npz")
    assert launched.num_tokens == single.num_tokens == (num_tokens, num_tokens)
    assert launched.metadata["ranks"] == RANKS
    rows = _sequence_rows(num_tokens, RANKS)
    for layer in range(single.num_layers):
        np.testing.assert_array_equal(launched.topk_ids[layer], single.topk_ids[layer][rows])
        np.testing.assert_allclose(launched.gate_weights[layer], single.gate_weights[layer][rows], atol=1e-6)
