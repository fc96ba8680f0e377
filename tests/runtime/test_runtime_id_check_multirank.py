"""A bad expert id on one rank, on 4 spawned gloo ranks (2 nodes x 2): on the normal paths the ids' range
travels in the header round, so every rank raises the same one-line error naming that rank, none waits
for it, and the next forward with valid ids runs (the group never left step)."""

from __future__ import annotations

import time

import pytest
import torch

from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.commands.selfcheck import make_case, make_experts, make_tokens
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.online.replay import reference_output
from ds_grace.topology import Topology

pytestmark = pytest.mark.multirank

TOPOLOGY = Topology(2, 2)
BAD_RANK = 2


def _rank(ctx: RankContext) -> list[dict]:
    case = make_case(5, 0, ctx.topology, ("fp32",))
    experts = [e.float() for e in make_experts(case, 5)]
    x_TD, ids_TK, w_TK = make_tokens(case, 5, ctx.rank)
    x_TD = x_TD.float()
    bad_TK = ids_TK.clone()
    if ctx.rank == BAD_RANK:
        bad_TK[0, 0] = case.plan.num_experts  # one id past the last expert
    reference = reference_output(experts, x_TD, ids_TK, w_TK).float()
    out = []
    with torch.no_grad():
        for path in ("flat", "hierarchical"):
            layer = GraceMoE.from_experts(
                experts, hidden_size=case.hidden, k=case.k, layer_plan=case.plan, topology=ctx.topology,
                ep_index=ctx.rank, options=RuntimeOptions(path=path),
            )  # fmt: skip
            start = time.perf_counter()
            try:
                layer.forward_routed(x_TD, bad_TK, w_TK)
                error = None
            except ValueError as exc:
                error = str(exc)
            seconds = time.perf_counter() - start
            y_TD = layer.forward_routed(x_TD, ids_TK, w_TK)
            diff = float((y_TD - reference).abs().max()) if y_TD.numel() else 0.0
            out.append({"path": path, "error": error, "seconds": seconds, "next_diff": diff})
    return out


def test_a_bad_id_on_one_rank_raises_on_every_rank_naming_it_and_the_group_stays_in_step():
    per_rank = run_on_ranks(_rank, topology=TOPOLOGY, timeout_s=300, collective_timeout_s=60)
    experts = make_case(5, 0, TOPOLOGY, ("fp32",)).plan.num_experts
    expected = (
        f"topk_ids_TK holds expert id {experts} on EP rank {BAD_RANK}; ids must be in [0, {experts}) "
        "or -1 (no route)"
    )
    for rank, runs in enumerate(per_rank):
        assert [r["path"] for r in runs] == ["flat", "hierarchical"]
        for run in runs:
            assert run["error"] == expected, (rank, run)
            assert run["seconds"] < 30, (rank, run)  # no rank waited for a collective timeout
            assert run["next_diff"] < 1e-4, (rank, run)  # the next forward is exact on every rank
