"""ds_grace.init_inference refuses bad set-ups with clear messages before any collective.

"Before any collective" is shown the strict way: no process group exists while the error is raised
(a launcher's world size comes from the environment only), the distributed start-up is replaced by a
function that fails the test if reached, and no process group exists afterwards.
"""

from __future__ import annotations

import json
import re

import pytest
from torch import nn

import ds_grace
from ds_grace.config import GraceConfigError
from ds_grace.models import (
    SUPPORTED_FAMILIES,
    CheckpointError,
    ModelAdapterError,
    load_checkpoint,
    tiny_checkpoint,
)
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError
from ds_grace.topology import Topology
from ds_grace.trace import TraceError


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return tiny_checkpoint("mixtral", tmp_path_factory.mktemp("errors") / "mixtral", seed=1)


@pytest.fixture(autouse=True)
def _no_collective(no_collective):
    """Every test here refuses its input before any collective."""
    yield


def _contiguous_plan(topology: Topology, *, num_layers: int = 2, num_experts: int = 8) -> GracePlan:
    per_rank = num_experts // topology.world_size
    layer = LayerPlan.from_lists(
        slots=[list(range(r * per_rank, (r + 1) * per_rank)) for r in range(topology.world_size)],
        primary=[e // per_rank for e in range(num_experts)],
    )
    return GracePlan(topology=topology, layers=(layer,) * num_layers)


def _config(tmp_path, plan: GracePlan | None = None, **grace) -> dict:
    block = dict(grace)
    if plan is not None:
        plan.save(tmp_path / "plan.json")
        block["plan"] = {"path": str(tmp_path / "plan.json")}
    return {"dtype": "fp32", "grace": block}


def test_plan_topology_mismatch(mixtral, tmp_path):
    config = _config(tmp_path, _contiguous_plan(Topology(1, 4)))
    with pytest.raises(
        PlanError,
        match=r"plan .*plan.json topology \(1 nodes x 4 GPUs\) does not match the cluster topology \(2 nodes x 2 GPUs\)",
    ):
        ds_grace.init_inference(str(mixtral), config=config)


def test_plan_layer_and_expert_count_mismatch(mixtral, tmp_path):
    with pytest.raises(
        PlanError, match=f"plan .*plan.json has 3 MoE layers but the checkpoint {mixtral} has 2"
    ):
        ds_grace.init_inference(
            str(mixtral), config=_config(tmp_path, _contiguous_plan(Topology(2, 2), num_layers=3))
        )
    with pytest.raises(
        PlanError, match=f"plan .*plan.json has 16 experts per layer but the checkpoint {mixtral} has 8"
    ):
        ds_grace.init_inference(
            str(mixtral), config=_config(tmp_path, _contiguous_plan(Topology(2, 2), num_experts=16))
        )


def test_plan_file_missing(mixtral, tmp_path):
    config = {"dtype": "fp32", "grace": {"plan": {"path": str(tmp_path / "nowhere.json")}}}
    with pytest.raises(PlanError, match=re.escape(f"plan file ({tmp_path / 'nowhere.json'}) does not exist")):
        ds_grace.init_inference(str(mixtral), config=config)


def test_plan_over_memory_cap(mixtral, tmp_path):
    config = _config(tmp_path, _contiguous_plan(Topology(2, 2)), grouping={"max_experts_per_gpu": 1})
    with pytest.raises(
        PlanError, match=r"gives rank 0 2 expert slots but grace.grouping.max_experts_per_gpu is 1"
    ):
        ds_grace.init_inference(str(mixtral), config=config)


def test_topology_does_not_fit_world_size(mixtral, tmp_path):
    config = _config(tmp_path, topology={"num_nodes": 2, "gpus_per_node": 4})
    with pytest.raises(GraceConfigError, match=r"must equal the expert-parallel world size \(4\)"):
        ds_grace.init_inference(str(mixtral), config=config)


def test_no_plan_and_no_trace_says_how_to_make_one(mixtral):
    with pytest.raises(
        GraceConfigError, match="grace.plan.path and grace.profile.trace are both unset"
    ) as info:
        ds_grace.init_inference(str(mixtral), config={"dtype": "fp32", "grace": {"enabled": True}})
    assert "ds-grace profile" in str(info.value) and "ds-grace plan" in str(info.value)


def test_trace_of_another_model(mixtral, tmp_path):
    from ds_grace.trace import synthetic

    synthetic(num_layers=3, num_experts=8, top_k=2, num_tokens=64).save(tmp_path / "trace.npz")
    config = {"dtype": "fp32", "grace": {"profile": {"trace": str(tmp_path / "trace.npz")}}}
    with pytest.raises(
        TraceError, match=f"records 3 MoE layers of 8 experts but the checkpoint {mixtral} has 2 of 8"
    ):
        ds_grace.init_inference(str(mixtral), config=config)


def test_missing_checkpoint_folder(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint folder ({missing}) does not exist")):
        ds_grace.init_inference(str(missing), config={"dtype": "fp32"})


def test_unknown_architecture_in_checkpoint(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(
        ModelAdapterError, match=r"model_type \('llama'\) is not a supported MoE family"
    ) as info:
        ds_grace.init_inference(str(folder), config={"dtype": "fp32"})
    assert all(family in str(info.value) for family in SUPPORTED_FAMILIES)


def test_unknown_architecture_as_module():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(
        ModelAdapterError, match=r"model_type \('llama'\) is not a supported MoE family; supported: mixtral"
    ):
        ds_grace.init_inference(dense, config={"dtype": "fp32"})
    with pytest.raises(ModelAdapterError, match="cannot tell the MoE family of Sequential"):
        ds_grace.init_inference(nn.Sequential(nn.Linear(4, 4)), config={"dtype": "fp32"})


def test_unsupported_moe_block_in_supported_family(mixtral):
    class CustomMoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(32, 8)
            self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(8))

    model = load_checkpoint(mixtral)
    model.model.layers[1].mlp = CustomMoE()
    with pytest.raises(
        ModelAdapterError, match=r"module model.layers.1.mlp is an MoE block of an unsupported class"
    ):
        ds_grace.init_inference(model, config={"dtype": "fp32"})


def test_deepspeed_config_errors(mixtral):
    with pytest.raises(GraceConfigError, match=r"dtype \('fp16'\) must be fp32 or bf16 on CPU"):
        ds_grace.init_inference(str(mixtral), config={"dtype": "fp16"})
    with pytest.raises(
        GraceConfigError, match=r"dtype \(unset, DeepSpeed's default fp16\) must be fp32 or bf16"
    ):
        ds_grace.init_inference(str(mixtral), config={})
    with pytest.raises(GraceConfigError, match="ds_config is not a valid DeepSpeed inference config"):
        ds_grace.init_inference(str(mixtral), config={"dtype": "fp32", "no_such_key": 1})
    with pytest.raises(GraceConfigError, match="replace_with_kernel_inject / injection_policy must be unset"):
        ds_grace.init_inference(str(mixtral), config={"dtype": "fp32", "replace_with_kernel_inject": True})
    with pytest.raises(GraceConfigError, match=r"tensor_parallel.tp_size \(2\) must be 1"):
        ds_grace.init_inference(str(mixtral), config={"dtype": "fp32", "tensor_parallel": {"tp_size": 2}})
    with pytest.raises(GraceConfigError, match=r"moe.ep_size \(2\) must be 4: vanilla DeepSpeed-MoE spreads"):
        ds_grace.init_inference(str(mixtral), config={"dtype": "fp32", "moe": {"ep_size": 2}})
    with pytest.raises(GraceConfigError, match=re.escape('grace.routing.policy ("nearest") must be')):
        ds_grace.init_inference(
            str(mixtral), config={"dtype": "fp32", "grace": {"routing": {"policy": "nearest"}}}
        )
    with pytest.raises(
        GraceConfigError, match=re.escape("dtype is given both in config ('fp32') and as a keyword")
    ):
        ds_grace.init_inference(str(mixtral), config={"dtype": "fp32"}, dtype="bf16")


def test_vanilla_needs_experts_divisible_by_world_size(mixtral, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_SIZE", "3")
    monkeypatch.setenv("CROSS_SIZE", "1")
    with pytest.raises(
        GraceConfigError, match=r"num_experts \(8\) must be divisible by the world size \(3\)"
    ):
        ds_grace.init_inference(str(mixtral), config={"dtype": "fp32"})


def test_valid_setup_reaches_the_distributed_start_up(mixtral, tmp_path):
    """The guard above is real: a valid set-up gets as far as the distributed start-up."""
    config = _config(tmp_path, _contiguous_plan(Topology(2, 2)))
    with pytest.raises(pytest.fail.Exception, match="reached the distributed start-up"):
        ds_grace.init_inference(str(mixtral), config=config)
