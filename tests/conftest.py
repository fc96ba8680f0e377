import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# launch/ holds plain scripts (probe_collectives, generate): tests import them by name
LAUNCH_DIR = Path(__file__).resolve().parents[1] / "launch"
if str(LAUNCH_DIR) not in sys.path:
    sys.path.insert(0, str(LAUNCH_DIR))

SHARED = Path(__file__).resolve().parents[2] / "shared"
TRACES = SHARED / "traces"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    if not TRACES.is_dir():
        pytest.fail(f"shared routing traces not found at {TRACES}")
    return TRACES


def refuse_distributed_start(monkeypatch, *, rank: int = 0) -> None:
    """A launcher environment of 4 ranks (2 nodes x 2) as `rank`, without a process group: reaching
    init_inference's distributed start-up fails the test (a refusal must come before any collective)."""
    import torch.distributed as dist

    import ds_grace.inference as inference

    assert not dist.is_initialized(), "a process group is already initialised in this test process"

    def reached(**_kwargs):
        pytest.fail("init_inference reached the distributed start-up before refusing its input")

    monkeypatch.setattr(inference, "init_distributed", reached)
    for name, value in {"WORLD_SIZE": "4", "RANK": str(rank), "LOCAL_SIZE": "2", "CROSS_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def no_collective(monkeypatch):
    """See refuse_distributed_start (rank 0)."""
    import torch.distributed as dist

    refuse_distributed_start(monkeypatch)
    yield
    assert not dist.is_initialized()
