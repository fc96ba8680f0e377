"""Sharded loading from checkpoint folders: what each rank reads and holds, both expert key layouts, and
the errors for bad checkpoints.

Ranks are loaded one after another in this process (loading needs no collective): for every family's
tiny checkpoint, GRACE (a plan with replicas) and vanilla (contiguous) placements on 2 nodes x 2.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ds_grace
from ds_grace.config import VanillaConfig
from ds_grace.models import CheckpointError, load_checkpoint, tiny_checkpoint
from ds_grace.models.adapters import HF_FAMILIES
from ds_grace.models.sharded_load import (
    ShardedCheckpoint,
    contiguous_experts,
    expert_slot_modules,
    held_bytes,
    list_tensors,
    load_converted,
)
from ds_grace.moe.layer import GraceMoE
from ds_grace.planning.plan import GracePlan, LayerPlan
from ds_grace.topology import Topology
from ds_grace.vanilla_hf import DeepSpeedRoutedExperts

TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2)
NUM_EXPERTS = 8
# 4 ranks, 8 experts: primaries 2 per rank plus replicas (expert 0 twice, 5 and 7 once)
GRACE_LAYER = LayerPlan.from_lists(
    slots=[[0, 3, 5], [1, 6, 0], [2, 4, 7, 0], [5, 7]],
    primary=[0, 1, 2, 0, 2, 3, 1, 3],
)


def _plan(num_layers: int) -> GracePlan:
    return GracePlan(topology=TOPOLOGY, layers=(GRACE_LAYER,) * num_layers)


def _slots(mode: str, layer: int, rank: int) -> list[int]:
    if mode == "grace":
        return list(GRACE_LAYER.slots[rank])
    return list(contiguous_experts(NUM_EXPERTS, ep_rank=rank, ep_size=TOPOLOGY.world_size))


def _load_rank(path, *, mode: str, rank: int, dtype: torch.dtype = torch.float32):
    """One rank's sharded load, as init_inference does it before DeepSpeed sees the model."""
    checkpoint = ShardedCheckpoint.open(path, dtype=dtype)
    hidden = int(checkpoint.config.hidden_size)
    plan = _plan(len(checkpoint.experts))

    def make(layer_index, experts):
        if mode == "grace":
            layer = GraceMoE.from_experts(
                experts,
                hidden_size=hidden,
                k=2,
                layer_plan=plan.layers[layer_index],
                topology=TOPOLOGY,
                ep_index=rank,
            )
            return layer.to("meta")
        return DeepSpeedRoutedExperts.contiguous(
            experts,
            ep_rank=rank,
            ep_size=TOPOLOGY.world_size,
            hidden_size=hidden,
            k=2,
            vanilla=VanillaConfig(),
        )

    blocks, stats = load_converted(
        checkpoint,
        make_routed_experts=make,
        slots_of_layer=lambda index: _slots(mode, index, rank),
        device="cpu",
    )
    return checkpoint, blocks, stats


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return {
        family: tiny_checkpoint(family, root / family, seed=3 + i) for i, family in enumerate(HF_FAMILIES)
    }


@pytest.fixture(scope="module")
def references(checkpoints):
    return {family: load_checkpoint(path) for family, path in checkpoints.items()}


def _expert_of_key(key: str) -> int | None:
    parts = key.split(".")
    index = parts.index("experts")
    return int(parts[index + 1]) if parts[index + 1].isdigit() else None


@pytest.mark.parametrize("mode", ["grace", "vanilla"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_each_rank_reads_and_holds_exactly_its_share(checkpoints, references, family, mode):
    path = checkpoints[family]
    tensors = list_tensors(path)
    dense_bytes = sum(info.nbytes for key, info in tensors.items() if ".experts." not in key)
    reference = references[family]
    ref_blocks = [m for m in reference.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
    for rank in range(TOPOLOGY.world_size):
        checkpoint, blocks, stats = _load_rank(path, mode=mode, rank=rank)
        per_expert = {}
        for layer in checkpoint.experts:
            keys = [k for k in tensors if k.startswith(f"{layer.prefix}.experts.0.")]
            per_expert[layer.layer_index] = sum(tensors[k].nbytes for k in keys)
        expected = dense_bytes + sum(
            per_expert[layer] * len(_slots(mode, layer, rank)) for layer in per_expert
        )
        assert held_bytes(checkpoint.model) == stats.own_share_bytes == expected
        assert stats.bytes_read == expected  # fp32 files served in fp32: bytes read == bytes held
        assert stats.checkpoint_bytes == sum(info.nbytes for info in tensors.values())
        # no rank reads a foreign expert: every expert tensor read belongs to one of its slots
        for layer in checkpoint.experts:
            read = [
                _expert_of_key(key)
                for key, _ in checkpoint.reader.reads
                if key.startswith(f"{layer.prefix}.experts.")
            ]
            own = _slots(mode, layer.layer_index, rank)
            assert sorted(read) == sorted(e for e in own for _ in range(3))
        # the slots hold the checkpoint's experts, byte for byte
        for index, block in enumerate(blocks):
            fused = ref_blocks[index].experts
            for expert, module in zip(_slots(mode, index, rank), expert_slot_modules(block.routed_experts)):
                assert torch.equal(module.gate_up_proj, fused.gate_up_proj[expert])
                assert torch.equal(module.down_proj, fused.down_proj[expert])
                assert module.gate_up_proj.requires_grad is False
                assert module.gate_up_proj.allreduce is False  # DeepSpeed's expert tag survives
        ref_state = reference.state_dict()
        for name, tensor in checkpoint.model.state_dict().items():
            if ".routed_experts." in name:
                continue
            assert torch.equal(tensor, ref_state[name.replace(".block.", ".")]), name


def _fused_copy(reference, source, target, *, shards: int = 1, drop_experts: int = 0):
    """`reference`'s state in the fused layout (transformers module names), in `shards` files."""
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if "rotary_emb" not in k}
    if drop_experts:
        state = {
            k: v[:-drop_experts] if k.endswith("_proj") and ".experts." in k else v for k, v in state.items()
        }
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(target / "model.safetensors"))
        return target
    weight_map = {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[shard::shards]}
        save_file(part, str(target / name))
        weight_map.update(dict.fromkeys(part, name))
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return target


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_and_per_expert_layouts_load_identical_weights(checkpoints, references, family, tmp_path):
    fused = _fused_copy(references[family], checkpoints[family], tmp_path / "fused", shards=3)
    for mode, rank in (("grace", 2), ("vanilla", 1)):
        per_expert_ckpt, _, per_expert_stats = _load_rank(checkpoints[family], mode=mode, rank=rank)
        fused_ckpt, fused_blocks, fused_stats = _load_rank(fused, mode=mode, rank=rank)
        assert {layer.layout for layer in fused_ckpt.experts} == {"fused"}
        assert {layer.layout for layer in per_expert_ckpt.experts} == {
            "w1_w3_w2" if family == "mixtral" else "gate_up_down"
        }
        a, b = per_expert_ckpt.model.state_dict(), fused_ckpt.model.state_dict()
        assert sorted(a) == sorted(b)
        for name in a:
            assert torch.equal(a[name], b[name]), name
        # only this rank's rows of the fused [E, ...] tensors are read
        assert fused_stats.bytes_read == per_expert_stats.bytes_read == fused_stats.own_share_bytes
        rows = {(key, row) for key, row in fused_ckpt.reader.reads if row is not None}
        assert {row for _, row in rows} == set(_slots(mode, 0, rank))
        for block in fused_blocks:  # a slot owns its row, not a view over the whole [E, ...] tensor
            for module in expert_slot_modules(block.routed_experts):
                for tensor in (module.gate_up_proj, module.down_proj):
                    assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_served_dtype_differs_from_the_files(checkpoints):
    checkpoint, _, stats = _load_rank(checkpoints["olmoe"], mode="vanilla", rank=3, dtype=torch.bfloat16)
    assert {t.dtype for t in checkpoint.model.state_dict().values()} == {torch.bfloat16}
    assert stats.bytes_read == 2 * stats.own_share_bytes == 2 * held_bytes(checkpoint.model)


# ---- bad checkpoints: clear errors before any collective (the no_collective fixture: tests/conftest.py) ----


def _serve(path, tmp_path, *, grace: bool = True):
    if not grace:
        return ds_grace.init_inference(str(path), config={"dtype": "fp32"})
    _plan(2).save(tmp_path / "plan.json")
    config = {"dtype": "fp32", "grace": {"plan": {"path": str(tmp_path / "plan.json")}}}
    return ds_grace.init_inference(str(path), config=config)


def test_missing_shard_file(checkpoints, references, tmp_path, no_collective):
    fused = _fused_copy(references["mixtral"], checkpoints["mixtral"], tmp_path / "ckpt", shards=2)
    (fused / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"shard file \(.*model-00002-of-00002.safetensors\) is missing: "
        r"model.safetensors.index.json maps \d+ tensors to it \(first: model\.",
    ):
        _serve(fused, tmp_path)


def test_index_names_an_absent_tensor(checkpoints, references, tmp_path, no_collective):
    fused = _fused_copy(references["mixtral"], checkpoints["mixtral"], tmp_path / "ckpt", shards=2)
    index = json.loads((fused / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    (fused / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"index.json maps tensor model.layers.0.extra.weight to .*model-00001-of-00002.safetensors, "
        r"which holds no tensor of that name",
    ):
        _serve(fused, tmp_path)


def test_shape_contradicting_config(checkpoints, tmp_path, no_collective):
    dense = tmp_path / "dense"
    shutil.copytree(checkpoints["mixtral"], dense)
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor model.embed_tokens.weight in .*model.safetensors has shape \[128, 32\] but "
        r".*config.json gives model.embed_tokens.weight the shape \[100, 32\]",
    ):
        _serve(dense, tmp_path, grace=False)
    experts = tmp_path / "experts"
    shutil.copytree(checkpoints["mixtral"], experts)
    (experts / "config.json").write_text(json.dumps({**config, "intermediate_size": 20}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor model.layers.0.block_sparse_moe.experts.0.w1.weight in .*model.safetensors has "
        r"shape \[24, 32\] but .*config.json gives \[20, 32\]",
    ):
        _serve(experts, tmp_path, grace=False)


def test_expert_count_differs_from_the_plan(checkpoints, references, tmp_path, no_collective):
    fused = _fused_copy(references["qwen3_moe"], checkpoints["qwen3_moe"], tmp_path / "ckpt", drop_experts=2)
    with pytest.raises(
        CheckpointError,
        match=r"MoE layer 0 \(model.layers.0.mlp.experts, fused layout, e.g. "
        r"model.layers.0.mlp.experts.gate_up_proj in .*model.safetensors\) holds 6 experts but the plan "
        r"\(.*plan.json\) has 8",
    ):
        _serve(fused, tmp_path)
    with pytest.raises(CheckpointError, match=r"holds 6 experts but the model has 8"):
        _serve(fused, tmp_path, grace=False)


def test_check_config_runs_the_checkpoint_checks(checkpoints, references, tmp_path, capsys, monkeypatch):
    """`ds-grace check-config --model DIR` refuses the checkpoint init_inference refuses, with its message,
    and reads only headers (a skeleton), never the weights."""
    from ds_grace.cli import main as cli_main

    fused = _fused_copy(references["qwen3_moe"], checkpoints["qwen3_moe"], tmp_path / "ckpt", drop_experts=2)
    _plan(2).save(tmp_path / "plan.json")
    config = tmp_path / "config.json"
    topology = {"num_nodes": 2, "gpus_per_node": 2}
    grace = {"plan": {"path": str(tmp_path / "plan.json")}, "topology": topology}
    config.write_text(json.dumps({"dtype": "fp32", "grace": grace}))
    import ds_grace.models

    monkeypatch.setattr(
        ds_grace.models, "load_checkpoint", lambda *a, **k: pytest.fail("check-config read the whole model")
    )
    argv = ["check-config", str(config), "--world-size", "4", "--model", str(fused)]
    assert cli_main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"error: checkpoint {fused}: MoE layer 0 (model.layers.0.mlp.experts, fused layout"
    )
    assert line.endswith(f"holds 6 experts but the plan ({tmp_path / 'plan.json'}) has 8")
    argv[-1] = str(checkpoints["qwen3_moe"])
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["model_checked"] is True


def test_unknown_expert_key_layout(checkpoints, tmp_path, no_collective):
    path = tmp_path / "renamed"
    path.mkdir()
    shutil.copy(checkpoints["olmoe"] / "config.json", path / "config.json")
    source = checkpoints["olmoe"] / "model.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        state = {key.replace(".gate_proj.", ".fc1."): handle.get_tensor(key) for key in handle.keys()}
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"unknown expert key layout for model.layers.0.mlp.experts.0: weights \['down_proj', 'fc1', "
        r"'up_proj'\]; expected \{gate_proj, up_proj, down_proj\} or \{w1, w2, w3\}",
    ):
        _serve(path, tmp_path)
    del state["model.layers.1.mlp.experts.3.fc1.weight"]
    state = {k.replace(".fc1.", ".gate_proj."): v for k, v in state.items()}
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"expert 3 of model.layers.1.mlp.experts has weights \['down_proj', 'up_proj'\]",
    ):
        _serve(path, tmp_path)


def test_missing_dense_tensor(checkpoints, tmp_path, no_collective):
    path = tmp_path / "nolmhead"
    path.mkdir()
    shutil.copy(checkpoints["qwen2_moe"] / "config.json", path / "config.json")
    with safe_open(str(checkpoints["qwen2_moe"] / "model.safetensors"), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys() if key != "lm_head.weight"}
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"has no tensor lm_head.weight \(shape \[128, 32\]\), which the model of .*config.json needs",
    ):
        _serve(path, tmp_path, grace=False)


def test_replicas_from_disk_need_a_checkpoint_folder(checkpoints, tmp_path, no_collective):
    from ds_grace.config import GraceConfigError

    _plan(2).save(tmp_path / "plan.json")
    online = {"enabled": True, "source": "disk"}
    config = {
        "dtype": "fp32",
        "grace": {"plan": {"path": str(tmp_path / "plan.json")}, "replication": {"online": online}},
    }
    with pytest.raises(
        GraceConfigError,
        match=r'online.source \("disk"\) reads replicas from the checkpoint: serve a checkpoint folder',
    ):
        ds_grace.init_inference(load_checkpoint(checkpoints["mixtral"]), config=config)


def test_tied_output_embeddings_are_shared_not_read_twice(tmp_path):
    path = tiny_checkpoint("qwen3_moe", tmp_path / "tied", seed=5, tie_word_embeddings=True)
    assert "lm_head.weight" not in list_tensors(path)
    checkpoint, _, stats = _load_rank(path, mode="vanilla", rank=0)
    model = checkpoint.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, load_checkpoint(path).lm_head.weight)
    assert held_bytes(model) == stats.own_share_bytes == stats.bytes_read
