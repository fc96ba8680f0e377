"""What ds_grace tells the operator: the "ds_grace" logger (INFO on rank 0 by default) on a real
init_inference, and DeepSpeed's accelerator warning kept out of ds-grace commands."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ds_grace
import ds_grace.log as grace_log
from ds_grace.config import GraceConfigError
from ds_grace.inference import log_path_summary
from ds_grace.models import tiny_checkpoint
from ds_grace.trace import synthetic

ROOT = Path(__file__).resolve().parents[2]


def _fresh_logger(monkeypatch):
    """The ds_grace logger as a process without logging configuration finds it (called in the test body:
    pytest installs its capture handlers on the root logger after the fixtures)."""
    monkeypatch.setattr(grace_log.logger, "handlers", [])
    monkeypatch.setattr(grace_log.logger, "level", logging.NOTSET)
    monkeypatch.setattr(grace_log.logger, "propagate", True)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.delenv(grace_log.ENV_LOG_LEVEL, raising=False)
    return grace_log.logger


def test_rank_zero_logs_info_and_the_others_warnings(monkeypatch):
    fresh_logger = _fresh_logger(monkeypatch)
    assert grace_log.rank_logger(0).getEffectiveLevel() == logging.INFO
    monkeypatch.setattr(fresh_logger, "handlers", [])
    assert grace_log.rank_logger(3).getEffectiveLevel() == logging.WARNING
    monkeypatch.setattr(fresh_logger, "handlers", [])
    monkeypatch.setenv(grace_log.ENV_LOG_LEVEL, "debug")
    assert grace_log.rank_logger(3).getEffectiveLevel() == logging.DEBUG
    monkeypatch.setattr(fresh_logger, "handlers", [])
    monkeypatch.setenv(grace_log.ENV_LOG_LEVEL, "loud")
    with pytest.raises(GraceConfigError, match=r"DS_GRACE_LOG_LEVEL \('loud'\) must be one of DEBUG"):
        grace_log.rank_logger(0)


def test_init_inference_says_what_it_did(tmp_path, monkeypatch, caplog):
    from ds_grace.comm.groups import clear_group_cache

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_SIZE"):
        monkeypatch.delenv(name, raising=False)
    model = tiny_checkpoint("mixtral", tmp_path / "mixtral", seed=1)
    synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=256).save(tmp_path / "trace.npz")
    grace = {"profile": {"trace": str(tmp_path / "trace.npz")}, "replication": {"enabled": False}}
    config = {"dtype": "fp32", "grace": grace}
    caplog.set_level(logging.INFO, logger="ds_grace")
    assert not dist.is_initialized()
    try:
        engine = ds_grace.init_inference(str(model), config=config)
        with torch.no_grad():
            engine.module(input_ids=torch.tensor([[3, 4, 5, 6]]))
        log_path_summary(engine.grace, logging.getLogger("ds_grace"))
        totals = engine.grace.traffic(total=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        clear_group_cache()
    messages = [record.getMessage() for record in caplog.records if record.name == "ds_grace"]
    assert any(m.startswith("plan ") for m in messages), messages
    plan_line = next(m for m in messages if m.startswith("plan "))
    assert f"built from {tmp_path / 'trace.npz'}" in plan_line and "content hash" in plan_line
    assert engine.grace.plan.content_hash[:16] in plan_line
    assert "start-up handshake passed: 1 ranks agree on settings, plan, layout and versions" in messages
    assert any(
        m.startswith("grace served on 1 nodes x 1 GPUs; checkpoint bytes read: rank 0 ") for m in messages
    )
    assert any(m.startswith("layer 1 all-to-all paths over 1 forwards: ") for m in messages), messages
    assert totals["ranks"] == 1 and set(totals["total"]) >= {"bytes_sent_inter", "rows_sent_intra"}


def test_ds_grace_commands_do_not_print_deepspeeds_accelerator_warning():
    done = subprocess.run(
        ["ds-grace", "check-config", str(ROOT / "ds_configs" / "vanilla_moe.json"), "--world-size", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    if torch.cuda.is_available():
        pytest.skip("with a CUDA device DeepSpeed detects it and does not warn")
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr
