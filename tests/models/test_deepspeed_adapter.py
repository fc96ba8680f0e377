"""A module holding deepspeed.moe.layer.MoE layers, converted, against its own eval forward
(drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False). fp32; atol 1e-6."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ds_grace.models import (
    ModelAdapterError,
    RoutedMoEBlock,
    convert_moe_blocks,
    model_family,
    set_routing_callback,
)

HIDDEN = 16
NUM_EXPERTS = 4


@pytest.fixture(scope="module")
def single_rank_group(tmp_path_factory):
    """A one-rank gloo process group (DeepSpeed's MoE needs torch.distributed initialised)."""
    created = not dist.is_initialized()
    if created:
        rendezvous = tmp_path_factory.mktemp("gloo") / "rendezvous"
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.fc2 = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _moe(k: int, **overrides):
    from deepspeed.moe.layer import MoE

    kwargs = {
        "hidden_size": HIDDEN,
        "expert": _Expert(),
        "num_experts": NUM_EXPERTS,
        "ep_size": 1,
        "k": k,
        "use_rts": False,
        "drop_tokens": False,
        "top2_2nd_expert_sampling": False,
        "min_capacity": 0,
    } | overrides
    return MoE(**kwargs)


class _TwoMoELayers(nn.Module):
    """Dense -> MoE -> dense -> MoE, the way a model holds DeepSpeed MoE layers."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(HIDDEN, HIDDEN)
        self.moe_a = _moe(k)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.moe_b = _moe(k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, l_aux_a, counts_a = self.moe_a(self.proj_in(x))
        y, l_aux_b, counts_b = self.moe_b(torch.tanh(self.mid(y)))
        return y, l_aux_a + l_aux_b, counts_a, counts_b


@pytest.mark.parametrize("k", [1, 2, 3])
def test_converted_deepspeed_moe_matches_its_eval_forward(single_rank_group, k):
    torch.manual_seed(k)
    model = _TwoMoELayers(k).eval()
    x = torch.randn(3, 10, HIDDEN)
    with torch.no_grad():
        expected, l_aux, counts_a, counts_b = model(x)
        hidden_a = model.proj_in(x).reshape(-1, HIDDEN)
        # DeepSpeed's own sparse routes of the first MoE layer: indices and gate values, [K, T].
        _, _, _, gate_ids_KT, _, gate_weights_KT, _ = model.moe_a.deepspeed_moe.gate(hidden_a, None, True)
    assert model_family(model) == "deepspeed_moe"

    blocks = convert_moe_blocks(model)
    assert [(b.layer_index, b.module_name, b.top_k) for b in blocks] == [(0, "moe_a", k), (1, "moe_b", k)]
    assert isinstance(model.moe_a, RoutedMoEBlock) and isinstance(model.proj_in, nn.Linear)
    assert not hasattr(model.moe_a.block.deepspeed_moe, "experts")
    recorded = []
    set_routing_callback(blocks, lambda layer, ids, weights: recorded.append((layer, ids, weights)))
    with torch.no_grad():
        actual, conv_l_aux, conv_counts_a, conv_counts_b = model(x)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(conv_l_aux, l_aux, atol=1e-6, rtol=1e-6)
    assert torch.equal(conv_counts_a, counts_a) and torch.equal(conv_counts_b, counts_b)
    assert [layer for layer, _, _ in recorded] == [0, 1]
    _, ids_TK, weights_TK = recorded[0]
    assert torch.equal(ids_TK, gate_ids_KT.t().long())
    assert torch.equal(weights_TK, gate_weights_KT.t())
    assert model_family(model) == "deepspeed_moe"


def test_deepspeed_output_convention_and_unsupported_settings(single_rank_group):
    holder = nn.Sequential(_moe(2))
    (block,) = convert_moe_blocks(holder)
    output, l_aux, exp_counts = block(torch.randn(2, 5, HIDDEN))
    assert output.shape == (2, 5, HIDDEN)
    assert l_aux.shape == () and float(l_aux.detach()) > 0
    assert exp_counts.shape == (NUM_EXPERTS,) and int(exp_counts.sum()) == 2 * 5 * 2
    with pytest.raises(ValueError, match=r"used_token must be None"):
        block(torch.randn(4, HIDDEN), torch.ones(4))

    with pytest.raises(ModelAdapterError, match=r"MoE ep_size \(2\) must be 1"):
        convert_moe_blocks(nn.Sequential(_moe(1, ep_size=2)))
    with pytest.raises(ModelAdapterError, match=r"MoE use_residual \(True\) is not supported"):
        convert_moe_blocks(nn.Sequential(_moe(1, use_residual=True)))
