"""DeepSpeed's own MoE checkpoints (engine.save_checkpoint's per-expert files) served with only the local
experts read: GRACE (its slots) from a model built on the meta device and from an expert-parallel model,
and vanilla DeepSpeed-MoE (contiguous experts), on 4 gloo ranks as 2 nodes x 2; then the checks that
refuse a bad checkpoint before any collective.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import ds_grace
from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.models import CheckpointError
from ds_grace.models.sharded_load import held_bytes
from ds_grace.models.toy import ToyMoEConfig, ToyMoEModel, toy_batch
from ds_grace.planning.plan import GracePlan, LayerPlan
from ds_grace.topology import Topology
from ds_grace.vanilla import reference_forward

TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2)
SAVED = ToyMoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=8, k=2, num_layers=2, ep_size=4, seed=3)
TOKENS = 12
LAYER = LayerPlan.from_lists(slots=[[0, 3, 5], [1, 6], [2, 4, 0], [7, 5]], primary=[0, 1, 2, 0, 2, 3, 1, 3])
EXPERT_BYTES = (16 * 32 + 32 + 32 * 16 + 16) * 4
pytestmark = pytest.mark.multirank


def _save_then_serve(ctx: RankContext, folder: str, plan_path: str) -> dict:
    import deepspeed
    from accelerate import init_empty_weights

    model = ToyMoEModel(SAVED, ep_rank=ctx.rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config={"train_micro_batch_size_per_gpu": 1}
    )
    engine.save_checkpoint(folder, tag="step0")
    dist.barrier()
    x_TD = toy_batch(TOKENS, SAVED.hidden_size, seed=ctx.rank)
    grace = {"topology": {"num_nodes": 2, "gpus_per_node": 2}, "plan": {"path": plan_path}}
    results = {}
    other_weights = replace(SAVED, seed=99)  # every served weight must come from the checkpoint
    with init_empty_weights():
        meta_model = ToyMoEModel(replace(other_weights, ep_size=1))
    cases = {
        "grace-meta": (meta_model, {"dtype": "fp32", "grace": grace}),
        "grace-ep": (ToyMoEModel(other_weights, ep_rank=ctx.rank), {"dtype": "fp32", "grace": grace}),
        "vanilla": (ToyMoEModel(other_weights, ep_rank=ctx.rank), {"dtype": "fp32"}),
    }
    for name, (module, config) in cases.items():
        served = ds_grace.init_inference(module, config=config, checkpoint=folder)
        with torch.no_grad():
            if name == "vanilla":
                from ds_grace.vanilla import vanilla_forward

                y_TD = vanilla_forward(served, x_TD)
            else:
                y_TD = served(x_TD)
        load = served.grace.load
        results[name] = {
            "y": y_TD,
            "held": held_bytes(served.module),
            "stats": load.as_dict(),
            "slots": {k: list(v) for k, v in load.expert_slots.items()},
        }
    return results


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed_checkpoint")
    GracePlan(topology=TOPOLOGY, layers=(LAYER, LAYER)).save(root / "plan.json")
    folder = root / "checkpoint"
    per_rank = run_on_ranks(
        _save_then_serve, topology=TOPOLOGY, args=(str(folder), str(root / "plan.json")), timeout_s=240
    )
    return root, folder, per_rank


def test_outputs_equal_the_saved_model_and_each_rank_reads_only_its_experts(served):
    _, _, per_rank = served
    dense_bytes = None
    for rank, results in enumerate(per_rank):
        x_TD = toy_batch(TOKENS, SAVED.hidden_size, seed=rank)
        want_TD = reference_forward(SAVED, x_TD)
        for name, result in results.items():
            torch.testing.assert_close(result["y"], want_TD, atol=1e-5, rtol=1e-4, msg=name)
            own = list(LAYER.slots[rank]) if name.startswith("grace") else [2 * rank, 2 * rank + 1]
            assert result["slots"] == {0: own, 1: own}, name
            stats = result["stats"]
            assert stats["expert_bytes"] == 2 * len(own) * EXPERT_BYTES
            assert result["held"] == stats["own_share_bytes"] == stats["bytes_read"], name
            dense_bytes = dense_bytes or stats["dense_bytes"]
            assert stats["dense_bytes"] == dense_bytes


@pytest.fixture
def no_collective(no_collective, monkeypatch):
    """tests/conftest.py's, as rank 1 of 4 (2 nodes x 2)."""
    monkeypatch.setenv("RANK", "1")
    yield


def _config(root) -> dict:
    return {"dtype": "fp32", "grace": {"plan": {"path": str(root / "plan.json")}}}


def test_bad_deepspeed_checkpoints(served, tmp_path, no_collective):
    root, folder, _ = served
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "step0" / "layer_1_expert_6_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"expert file \(.*step0/layer_1_expert_6_mp_rank_00_model_states.pt\) is missing: "
        r".*mp_rank_00_model_states.pt records 8 experts in MoE layer 1",
    ):
        ds_grace.init_inference(
            ToyMoEModel(replace(SAVED, ep_size=1)), config=_config(root), checkpoint=str(broken)
        )
    wider = replace(SAVED, hidden_size=24, ep_size=1)
    with pytest.raises(
        CheckpointError,
        match=r"tensor blocks.0.dense_norm.weight in .*mp_rank_00_model_states.pt has shape \[16\] but the "
        r"model's is \[24\]",
    ):
        ds_grace.init_inference(ToyMoEModel(wider), config={"dtype": "fp32"}, checkpoint=str(folder))
    deeper = replace(SAVED, num_layers=3, ep_size=1)
    with pytest.raises(CheckpointError, match=r"records num_experts \[8, 8\] but the model has 3 MoE layers"):
        ds_grace.init_inference(ToyMoEModel(deeper), config={"dtype": "fp32"}, checkpoint=str(folder))
    fewer = replace(SAVED, num_experts=4, ep_size=1)
    with pytest.raises(
        CheckpointError, match=r"MoE layer 0 \(blocks.0.moe\) holds 8 experts but the model has 4"
    ):
        ds_grace.init_inference(ToyMoEModel(fewer), config={"dtype": "fp32"}, checkpoint=str(folder))
    with pytest.raises(CheckpointError, match=r"must be a folder DeepSpeed's save_checkpoint wrote"):
        ds_grace.init_inference(
            ToyMoEModel(replace(SAVED, ep_size=1)), config=_config(root), checkpoint=str(root)
        )
