"""The path cost model without processes: the summary each rank sends, and the decision from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_grace.comm.path_model import PathModel, choose_hierarchical, path_costs, rank_summary
from ds_grace.config import GraceConfigError, parse_grace_block
from ds_grace.moe.layer import RuntimeOptions
from ds_grace.topology import Topology

TOPO = Topology(2, 2)


def test_summary_counts_flat_stage1_and_stage2_rows_by_hand() -> None:
    # rank 0 (node 0, local 0): t0 -> ranks 1, 2, 3; t1 -> rank 0 only; t2 -> ranks 2 and 3
    member_TR = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    summary = rank_summary(member_TR, ep_index=0, topology=TOPO).tolist()
    flat, stage1, stage2 = summary[0:2], summary[2:4], summary[4:6]
    assert flat == [1, 4]  # to node 0: t0 -> rank 1 (rank 0 itself excluded); to node 1: 2 + 2 rows
    assert stage1 == [0, 2]  # t0 and t2 cross to node 1 once each; nothing crosses to its own node
    # relay of node 1 for local rank 0 is rank 2: forwards t0 and t2 to rank 3; node 0: t0 to rank 1
    assert stage2 == [1, 2]


def test_costs_prefer_hierarchical_when_dedup_saves_link_bytes_and_flat_when_rounds_dominate() -> None:
    # every rank: 10 flat rows to the other node, 4 after per-node dedup, 6 forwarded inside the node
    summary_RC = np.array([[0, 10, 0, 4, 0, 6] if r < 2 else [10, 0, 4, 0, 6, 0] for r in range(4)])
    link_bound = PathModel(alpha_ep_s=1e-3, alpha_intra_s=1e-3, inter_s_per_byte=1e-6, intra_s_per_byte=1e-9)
    flat, hier = path_costs(summary_RC, topology=TOPO, model=link_bound, row_bytes=1000)
    # flat: 2 alpha + 2 x 1000 B x (busiest link 20 rows x 1e-6 + no intra rows x 1e-9)
    assert flat == pytest.approx(2e-3 + 2000 * 20 * 1e-6)
    # hierarchical: + 2 intra rounds; link 8 rows; the busiest relay forwards 6 rows inside its node
    assert hier == pytest.approx(4e-3 + 2000 * (8 * 1e-6 + 6 * 1e-9))
    assert choose_hierarchical(summary_RC, topology=TOPO, model=link_bound, row_bytes=1000)
    round_bound = PathModel(alpha_ep_s=1e-3, alpha_intra_s=5e-3, inter_s_per_byte=1e-9, intra_s_per_byte=1e-9)
    assert not choose_hierarchical(summary_RC, topology=TOPO, model=round_bound, row_bytes=1000)
    # a tie keeps the flat path (fewer rounds)
    zero = PathModel(0.0, 0.0, 0.0, 0.0)
    assert not choose_hierarchical(summary_RC, topology=TOPO, model=zero, row_bytes=1000)


def test_config_fields_validated_and_mapped_to_the_runtime() -> None:
    options = RuntimeOptions.from_config(parse_grace_block({}))
    assert options.adaptive_path and options.low_latency_max_tokens == 64
    flat = RuntimeOptions.from_config(
        parse_grace_block({"communication": {"hierarchical": False, "dedup": False}})
    )
    assert not flat.adaptive_path and flat.low_latency_max_tokens == 0
    with pytest.raises(
        GraceConfigError,
        match=r"grace\.communication\.low_latency_max_tokens \(-1\) .*greater than or equal to 0",
    ):
        parse_grace_block({"communication": {"low_latency_max_tokens": -1}})
    with pytest.raises(
        GraceConfigError,
        match=r"low_latency_max_tokens \(8\) must be 0 when grace\.communication\.dedup is false",
    ):
        parse_grace_block(
            {"communication": {"hierarchical": False, "dedup": False, "low_latency_max_tokens": 8}}
        )
    with pytest.raises(GraceConfigError, match=r"grace\.communication\.adaptive_path \(\"yes\"\)"):
        parse_grace_block({"communication": {"adaptive_path": "yes"}})
    with pytest.raises(
        ValueError, match=r"low_latency_max_tokens \(4\) must be 0 when grace\.communication\.dedup"
    ):
        RuntimeOptions(hierarchical=False, dedup=False, low_latency_max_tokens=4)
