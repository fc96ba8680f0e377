"""Several profiles at once (`ds-grace plan --trace A --trace B [--trace-weights ...]`, planning/mix.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ds_grace.cli import main as cli_main
from ds_grace.planning.mix import mix_traces
from ds_grace.planning.stats import affinity_matrices
from ds_grace.trace import RoutingTrace, TraceError, synthetic


def _trace(rows: list[list[int]], repeat: int) -> RoutingTrace:
    return RoutingTrace(topk_ids=(np.array(rows * repeat),), num_experts=4)


def test_shares_follow_the_weights_and_the_profiles_interleave():
    small, large = _trace([[0, 1]], 10), _trace([[2, 3]], 90)
    mixed = mix_traces([small, large])
    ids = mixed.topk_ids[0]
    assert len(ids) == 90 and (ids[:, 0] == 0).sum() == 45 and (ids[:, 0] == 2).sum() == 45
    assert set(ids[:2, 0]) == {0, 2}  # both profiles from the start: recency sees both
    weighted = mix_traces([small, large], weights=[1, 2]).topk_ids[0]
    assert (weighted[:, 0] == 0).sum() == 30 and (weighted[:, 0] == 2).sum() == 60


def test_co_activation_seen_in_both_profiles_counts_for_more():
    a = _trace([[0, 1], [2, 3]], 50)
    b = _trace([[0, 1], [0, 2]], 50)
    affinity = affinity_matrices(mix_traces([a, b]))[0]
    assert affinity[0, 1] > affinity[2, 3] and affinity[0, 1] > affinity[0, 2]


def test_bad_mixes_are_errors():
    a = synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=100, seed=1)
    with pytest.raises(TraceError, match=r"must be 2 finite numbers > 0"):
        mix_traces([a, a], weights=[1, 0])
    with pytest.raises(TraceError, match=r"trace 1 \(2 layers x 16 experts"):
        mix_traces([a, synthetic(num_layers=2, num_experts=16, top_k=2, num_tokens=100, seed=1)])


def test_cli_plans_for_several_profiles(tmp_path, capsys):
    for seed in (1, 2):
        synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=400, seed=seed).save(
            tmp_path / f"{seed}.npz"
        )
    base = ["plan", "--trace", str(tmp_path / "1.npz"), "--nodes", "2", "--gpus-per-node", "2"]
    two = [*base, "--trace", str(tmp_path / "2.npz")]
    assert cli_main([*two, "--trace-weights", "1", "3", "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads(capsys.readouterr().out)["experts"] == 8
    assert cli_main([*base, "--trace-weights", "1", "--out", str(tmp_path / "q.json")]) == 2
    assert "needs several --trace" in capsys.readouterr().err
    assert cli_main([*two, "--trace-weights", "1", "--out", str(tmp_path / "q.json")]) == 2
    assert "must be 2 finite numbers > 0" in capsys.readouterr().err
