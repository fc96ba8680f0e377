"""GraceMoE in one process (1 x 1 topology, no collectives) and its construction on any topology."""

from __future__ import annotations

import pytest
import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, TopKGate
from deepspeed.moe.utils import has_moe_layers, is_moe_param
from torch import nn

from ds_grace.comm.counters import collect_counters, reset_counters
from ds_grace.config import load_ds_config
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.planning.plan import LayerPlan, PlanError
from ds_grace.topology import Topology

HIDDEN, EXPERTS = 16, 8
ONE = Topology(1, 1)
ONE_RANK_PLAN = LayerPlan.from_lists(slots=[list(range(EXPERTS))], primary=[0] * EXPERTS)


def _expert() -> nn.Module:
    return nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))


def _deepspeed_moe(k: int, *, use_residual: bool = False) -> MoE:
    torch.manual_seed(k)
    moe = MoE(
        HIDDEN,
        _expert(),
        num_experts=EXPERTS,
        ep_size=1,
        k=k,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
        min_capacity=0,
        use_residual=use_residual,
    ).eval()
    with torch.no_grad():
        for param in moe.deepspeed_moe.experts.parameters():
            param.normal_()
    return moe


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("hierarchical", [True, False])
def test_single_rank_equals_deepspeed(k, hierarchical):
    ds_moe = _deepspeed_moe(k, use_residual=(k == 2))
    grace = GraceMoE.from_deepspeed(
        ds_moe,
        layer_plan=ONE_RANK_PLAN,
        topology=ONE,
        options=RuntimeOptions(path="hierarchical" if hierarchical else "flat"),
    ).eval()
    x = torch.randn(3, 11, HIDDEN)
    with torch.no_grad():
        y_ds, l_ds, counts_ds = ds_moe(x)
        y, l_aux, counts = grace(x)
    assert y.shape == x.shape
    assert (y - y_ds).abs().max().item() <= 1e-5 * max(1.0, y_ds.abs().max().item())
    assert torch.equal(l_aux, l_ds) and torch.equal(counts, counts_ds)
    assert sum(grace.comm_counters.expert_rows) == 33 * k
    assert (
        grace.comm_counters.total().rows_sent_inter == 0 and grace.comm_counters.total().rows_sent_intra == 0
    )


def test_bf16_single_rank_within_tolerance_and_zero_tokens():
    ds_moe = _deepspeed_moe(2).to(torch.bfloat16)
    grace = GraceMoE.from_deepspeed(ds_moe, layer_plan=ONE_RANK_PLAN, topology=ONE)
    x = torch.randn(40, HIDDEN).to(torch.bfloat16)
    with torch.no_grad():
        y_ds = ds_moe(x)[0].float()
        y = grace(x)[0]
        empty = grace(torch.zeros(0, HIDDEN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    # both sum the routes in fp32 and round once; they differ only by summation order
    assert (y.float() - y_ds).abs().max().item() <= 2**-7 * max(1.0, y_ds.abs().max().item())
    assert empty[0].shape == (0, HIDDEN) and empty[2].tolist() == [0] * EXPERTS


def test_forward_routed_takes_any_k_and_masked_routes():
    experts = [_expert() for _ in range(EXPERTS)]
    grace = GraceMoE.from_experts(experts, hidden_size=HIDDEN, k=8, layer_plan=ONE_RANK_PLAN, topology=ONE)
    x_TD = torch.randn(9, HIDDEN)
    ids_TK = torch.stack([torch.randperm(EXPERTS) for _ in range(9)])
    ids_TK[0, 3] = -1
    weights_TK = torch.rand(9, EXPERTS)
    with torch.no_grad():
        y_TD = grace.forward_routed(x_TD, ids_TK, weights_TK)
        expected = torch.zeros(9, HIDDEN)
        for t in range(9):
            for k in range(EXPERTS):
                if ids_TK[t, k] >= 0:
                    expected[t] += weights_TK[t, k] * experts[ids_TK[t, k]](x_TD[t : t + 1])[0]
    assert (y_TD - expected).abs().max().item() < 1e-5
    assert sum(grace.comm_counters.expert_rows) == 9 * EXPERTS - 1


def test_deepspeed_discovery_attributes_and_parameter_tags():
    topology = Topology(2, 2)
    plan = LayerPlan.from_lists(
        slots=[[0, 1, 2, 7], [3, 7], [4, 5], [6, 0]],
        primary=[0, 0, 0, 1, 2, 2, 3, 1],
        slot_weights=[[1, 1, 1, 2], [1, 1], [1, 1], [1, 3]],
    )
    experts = [_expert() for _ in range(EXPERTS)]
    grace = GraceMoE.from_experts(
        experts, hidden_size=HIDDEN, k=2, layer_plan=plan, topology=topology, ep_index=3
    )
    model = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), grace)
    assert has_moe_layers(model) == (True, EXPERTS)
    assert isinstance(grace, MoE) and isinstance(grace.deepspeed_moe, MOELayer)
    assert isinstance(grace.deepspeed_moe.gate, TopKGate) and isinstance(grace.deepspeed_moe.experts, Experts)
    assert grace.num_local_experts == 2 and grace.deepspeed_moe.num_local_experts == 2
    assert grace.expert_group_name == "ep_size_4" and grace.ep_size == 4 and grace.num_experts == EXPERTS
    assert grace.deepspeed_moe.experts.slot2expert == (6, 0)
    slot_modules = grace.deepspeed_moe.experts.deepspeed_experts
    for slot, e in enumerate((6, 0)):
        for mine, source in zip(slot_modules[slot].parameters(), experts[e].parameters()):
            assert torch.equal(mine, source) and mine.data_ptr() != source.data_ptr()
            assert is_moe_param(mine) and mine.group_name == "ep_size_4"
    assert not any(is_moe_param(p) for p in grace.deepspeed_moe.gate.parameters())


def test_counters_collect_and_reset_by_layer_name():
    experts = [_expert() for _ in range(EXPERTS)]
    model = nn.ModuleDict(
        {
            "first": GraceMoE.from_experts(
                experts, hidden_size=HIDDEN, k=2, layer_plan=ONE_RANK_PLAN, topology=ONE
            ),
            "second": GraceMoE.from_experts(
                experts, hidden_size=HIDDEN, k=1, layer_plan=ONE_RANK_PLAN, topology=ONE
            ),
        }
    )
    with torch.no_grad():
        model["first"](torch.randn(5, HIDDEN))
    snapshot = collect_counters(model)
    assert sorted(snapshot) == ["first", "second"]
    assert snapshot["first"]["forwards"] == 1 and sum(snapshot["first"]["expert_rows"]) == 10
    assert snapshot["second"]["forwards"] == 0
    reset_counters(model)
    assert collect_counters(model)["first"]["forwards"] == 0


def test_runtime_options_from_config_and_errors():
    _, grace_config = load_ds_config(
        {
            "grace": {
                "routing": {"policy": "wrr"},
                "communication": {"path": "flat", "dedup": False, "timeout_s": 7},
            }
        }
    )
    assert RuntimeOptions.from_config(grace_config) == RuntimeOptions(
        policy="wrr", path="flat", dedup=False, timeout_s=7.0, low_latency_policy="primary"
    )
    with pytest.raises(
        ValueError, match=r"grace.routing.low_latency_policy \('nearest'\) must be null or one of tar, wrr"
    ):
        RuntimeOptions(low_latency_policy="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"routing.low_latency_policy"):
        load_ds_config({"grace": {"routing": {"low_latency_policy": "nearest"}}})
    with pytest.raises(
        ValueError, match=r"grace.routing.policy \('nearest'\) must be one of tar, wrr, primary"
    ):
        RuntimeOptions(policy="nearest")
    with pytest.raises(ValueError, match=r"grace.communication.dedup \(false\) must be true when"):
        RuntimeOptions(path="hierarchical", dedup=False)
    with pytest.raises(ValueError, match=r"grace.communication.timeout_s \(0.0\) must be > 0"):
        RuntimeOptions(timeout_s=0.0)


def test_construction_errors_name_the_argument():
    experts = [_expert() for _ in range(EXPERTS)]
    with pytest.raises(ValueError, match=r"experts has 7 modules but the plan has 8 experts"):
        GraceMoE.from_experts(experts[:7], hidden_size=HIDDEN, k=2, layer_plan=ONE_RANK_PLAN, topology=ONE)
    with pytest.raises(
        ValueError, match=r"layer_plan places experts on 1 ranks but the topology \(2 nodes x 1 GPUs\)"
    ):
        GraceMoE.from_experts(
            experts, hidden_size=HIDDEN, k=2, layer_plan=ONE_RANK_PLAN, topology=Topology(2, 1), ep_index=0
        )
    with pytest.raises(ValueError, match=r"ep_index \(4\) must be in \[0, 2\)"):
        GraceMoE.from_experts(
            experts, hidden_size=HIDDEN, k=2, layer_plan=ONE_RANK_PLAN, topology=Topology(2, 1), ep_index=4
        )
    with pytest.raises(ValueError, match=r"ep_index is required when torch.distributed is not initialised"):
        GraceMoE.from_experts(
            experts, hidden_size=HIDDEN, k=2, layer_plan=ONE_RANK_PLAN, topology=Topology(2, 1)
        )
    bad_plan = LayerPlan.from_lists(slots=[list(range(EXPERTS - 1))], primary=[0] * EXPERTS)
    with pytest.raises(
        PlanError, match=r"layer_plan: experts \[7\] have no instance; every expert needs >= 1"
    ):
        GraceMoE.from_experts(experts, hidden_size=HIDDEN, k=2, layer_plan=bad_plan, topology=ONE)
    with pytest.raises(
        ValueError, match=r"gate_weight \(shape \(8, 3\)\) must be \[num_experts=8, hidden_size=16\]"
    ):
        GraceMoE.from_experts(
            experts,
            hidden_size=HIDDEN,
            k=2,
            layer_plan=ONE_RANK_PLAN,
            topology=ONE,
            gate_weight=torch.zeros(EXPERTS, 3),
        )


def test_forward_routed_input_errors():
    grace = GraceMoE.from_experts(
        [_expert() for _ in range(EXPERTS)], hidden_size=HIDDEN, k=2, layer_plan=ONE_RANK_PLAN, topology=ONE
    )
    x_TD = torch.randn(3, HIDDEN)
    with pytest.raises(
        ValueError, match=r"topk_ids_TK holds expert id 8 on EP rank 0; ids must be in \[0, 8\) or -1"
    ):
        grace.forward_routed(x_TD, torch.tensor([[0, 8]] * 3), torch.ones(3, 2))
    with pytest.raises(
        ValueError, match=r"topk_weights_TK \(shape \(3, 1\)\) must match topk_ids_TK \(\(3, 2\)\)"
    ):
        grace.forward_routed(x_TD, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"topk_ids_TK \(shape \(2, 2\)\) must be \[tokens=3, k\]"):
        grace.forward_routed(x_TD, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"x_TD \(shape \(1, 3, 16\)\) must be 2-D"):
        grace.forward_routed(x_TD[None], torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


@pytest.mark.parametrize(
    "make_expert, dtype",
    [
        (lambda: nn.Linear(8, 8), torch.bfloat16),  # stacked slots: grouped GEMMs (bf16, as on CUDA)
        (lambda: nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), torch.float32),  # every slot on every row
    ],
    ids=["grouped", "every-slot"],
)
def test_low_latency_path_has_static_shapes_under_fake_tensors(make_expert, dtype):
    """The low-latency forward's tensor work runs under FakeTensorMode: no data-dependent op, no host read
    (what CUDA-graph capture needs); a rank holding more tokens than promised fails before any collective."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    experts = [make_expert().to(dtype) for _ in range(4)]
    plan = LayerPlan.from_lists(slots=[[0, 1, 2, 3]], primary=[0, 0, 0, 0])
    layer = GraceMoE.from_experts(
        experts, hidden_size=8, k=2, layer_plan=plan, topology=ONE, ep_index=0,
        options=RuntimeOptions(low_latency_max_tokens=16),
    ).eval()  # fmt: skip
    x_TD = torch.randn(5, 8, dtype=dtype)
    ids_TK = torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0], [2, 1]])
    w_TK = torch.rand(5, 2)
    with torch.no_grad():
        real = layer.forward_routed(x_TD, ids_TK, w_TK, low_latency_tokens=8)
        normal = layer.forward_routed(x_TD, ids_TK, w_TK)
        torch.testing.assert_close(real, normal)
        stacked = layer.deepspeed_moe.experts.stacked_slots(x_TD)
        assert (stacked is not None) == (dtype == torch.bfloat16)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = layer.forward_routed(
                mode.from_tensor(x_TD), mode.from_tensor(ids_TK), mode.from_tensor(w_TK), low_latency_tokens=8
            )
        assert tuple(fake.shape) == (5, 8)
        with pytest.raises(
            ValueError, match=r"this rank holds 5 tokens but the forward was promised low_latency_tokens=4"
        ):
            layer.forward_routed(x_TD, ids_TK, w_TK, low_latency_tokens=4)
        with pytest.raises(
            ValueError,
            match=r"low_latency_tokens \(32\) must be in \[1, grace\.communication\.low_latency_max_tokens=16\]",
        ):
            layer.forward_routed(x_TD, ids_TK, w_TK, low_latency_tokens=32)


def test_low_latency_forwards_keep_a_bounded_count_of_device_row_counts():
    """A decode loop that never reads the counters holds at most PENDING_ROWS_FOLD device tensors of
    routes per slot (added up on the device as they come), and the total stays exact."""
    from ds_grace.comm.counters import PENDING_ROWS_FOLD

    torch.manual_seed(0)
    layer = GraceMoE.from_experts(
        [_expert() for _ in range(EXPERTS)], hidden_size=HIDDEN, k=2, layer_plan=ONE_RANK_PLAN, topology=ONE,
        ep_index=0, options=RuntimeOptions(low_latency_max_tokens=4),
    ).eval()  # fmt: skip
    ids_TK = torch.tensor([[0, 1], [2, -1], [3, 0]])
    forwards = 3 * PENDING_ROWS_FOLD + 5
    with torch.no_grad():
        for _ in range(forwards):
            layer.forward_routed(torch.randn(3, HIDDEN), ids_TK, torch.rand(3, 2), low_latency_tokens=4)
            assert len(layer.comm_counters._pending_rows) < PENDING_ROWS_FOLD
    assert sum(layer.comm_counters.expert_rows) == 5 * forwards


def test_a_whole_layer_forward_reads_the_host_once_the_header():
    """Gate included (GraceMoE.forward): on the normal path the header round's read is the only one."""
    from benchmarks.counting import count_hot_path

    grace = GraceMoE.from_experts(
        [_expert() for _ in range(EXPERTS)], hidden_size=HIDDEN, k=2, layer_plan=ONE_RANK_PLAN, topology=ONE
    ).eval()
    x_BTD = torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        grace(x_BTD)  # the device tables are built on the first forward
        with count_hot_path(list(grace.deepspeed_moe.experts.deepspeed_experts)) as counts:
            grace(x_BTD)
    assert counts.host_reads == {"tolist": 1}
