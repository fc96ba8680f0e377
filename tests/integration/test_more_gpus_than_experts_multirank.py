"""More GPUs than experts, served: a tiny 4-expert Mixtral on 8 gloo ranks laid out as 2 nodes x 4, one
expert slot per GPU (each expert once per node). Every rank reads from the checkpoint folder only its
slot, the continuations equal single-process transformers token for token, the prefill logits match
(fp32, atol=1e-5, rtol=1e-4), and no row crosses the node boundary (every node holds every expert).
"""

from __future__ import annotations

import pytest
import torch
from integration_cases import HFCase, calibration_batches, hf_reference, prompt_batch, serve_cases_on_rank

from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.models import load_checkpoint, tiny_checkpoint
from ds_grace.planning.build import build_plan
from ds_grace.profiling import profile_routing
from ds_grace.topology import Topology

pytestmark = pytest.mark.multirank

TOPOLOGY = Topology(num_nodes=2, gpus_per_node=4)
NUM_EXPERTS = 4
ATOL, RTOL = 1e-5, 1e-4


def _serve_and_report_load(ctx: RankContext, case: HFCase) -> tuple[object, dict]:
    (result,) = serve_cases_on_rank(ctx, [case])
    return result, result.load  # the served engine's own load stats


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("four_experts")
    checkpoint = tiny_checkpoint("mixtral", root / "mixtral4", seed=41, num_local_experts=NUM_EXPERTS)
    input_ids, attention_mask = prompt_batch(seed=2)
    reference = hf_reference(checkpoint, input_ids, attention_mask)
    trace = profile_routing(
        load_checkpoint(checkpoint), calibration_batches(5, batches=4, rows=4, length=32), tokens=512
    )
    plan = build_plan(trace, topology=TOPOLOGY, replication={"slots_per_gpu": 1})
    plan.save(root / "plan.json")
    block = {
        "topology": {"num_nodes": 2, "gpus_per_node": 4},
        "communication": {"timeout_s": 60},
        "plan": {"path": str(root / "plan.json")},
    }
    case = HFCase(
        "mixtral4/grace", str(checkpoint), {"dtype": "fp32", "grace": block}, input_ids, attention_mask
    )
    per_rank = run_on_ranks(
        _serve_and_report_load, topology=TOPOLOGY, args=(case,), timeout_s=400, collective_timeout_s=90
    )
    return per_rank, plan, reference, attention_mask


def test_served_lossless_on_more_gpus_than_experts(served):
    per_rank, _, reference, attention_mask = served
    results = [result for result, _ in per_rank]
    assert all(result.mode == "grace" for result in results)
    tokens = torch.cat([result.outputs["tokens"] for result in results])
    assert torch.equal(tokens, reference.tokens_PN), (tokens, reference.tokens_PN)
    real = attention_mask.bool()
    logits = torch.cat([result.outputs["logits"] for result in results])
    torch.testing.assert_close(logits[real], reference.logits_PWV[real], atol=ATOL, rtol=RTOL)
    assert sum(result.stats["rows_sent_inter"] for result in results) == 0  # each node holds every expert
    assert sum(result.stats["rows_sent_intra"] for result in results) > 0


def test_each_rank_reads_only_its_slot(served):
    per_rank, plan, _, _ = served
    for rank, (result, load) in enumerate(per_rank):
        assert result.local_experts == [1] * plan.num_layers
        held = {int(layer): tuple(experts) for layer, experts in load["expert_slots"].items()}
        assert held == {i: layer.slots[rank] for i, layer in enumerate(plan.layers)}
    reads = [load["bytes_read"] for _, load in per_rank]
    assert max(reads) == min(reads)  # dense part plus one expert per layer on every rank
