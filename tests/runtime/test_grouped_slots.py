"""Stacked slot weights (ds_grace.moe.grouped): the grouped GEMM form equals running each slot's module,
the modules' parameters become views of the stacks (no second copy), and rebinding, in-place writes,
deep copies and autograd keep working."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ds_grace.models.experts import GatedExpertMLP, TensorOutputExpert
from ds_grace.moe.experts import GraceExperts
from ds_grace.moe.grouped import CPU_GROUPED_MAX_ROWS_PER_SLOT, StackedSlots

D, F, SLOTS = 8, 16, 4


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))


def _gated() -> nn.Module:
    return GatedExpertMLP(gate_up_proj=torch.randn(2 * F, D), down_proj=torch.randn(D, F), act_fn=nn.SiLU())


FORMS = {
    "linear": lambda: nn.Linear(D, D),
    "linear-no-bias": lambda: nn.Linear(D, D, bias=False),
    "mlp": _mlp,
    "gated": _gated,
    "wrapped-mlp": lambda: TensorOutputExpert(_mlp()),
}


def _experts(make) -> tuple[GraceExperts, list[nn.Module]]:
    torch.manual_seed(0)
    modules = [make() for _ in range(SLOTS)]
    reference = copy.deepcopy(modules)
    return GraceExperts(modules, slot2expert=range(SLOTS), expert_group_name="ep_size_1"), reference


def _loop(reference: list[nn.Module], x_QD: torch.Tensor, splits: list[int]) -> torch.Tensor:
    return torch.cat([m(x) for m, x in zip(reference, x_QD.split(splits))])


@pytest.mark.parametrize("form", FORMS)
def test_grouped_form_equals_each_slot_module_and_shares_their_storage(form):
    experts, reference = _experts(FORMS[form])
    splits = [3, 0, 5, 2]  # an empty slot in the middle
    x_QD = torch.randn(sum(splits), D)
    with torch.no_grad():
        out = experts(x_QD, splits)
        assert experts.stacked_slots(x_QD) is not None
        torch.testing.assert_close(out, _loop(reference, x_QD, splits))
        # with each row's slot (as the runtime passes it) the group ends come from it on the device
        slot_Q = torch.repeat_interleave(torch.arange(SLOTS), torch.tensor(splits))
        torch.testing.assert_close(experts(x_QD, splits, slot_Q=slot_Q), out)
        # the low-latency form: routes of 6 rows, -1 (slot count) where a route is not local
        slot_VK = torch.tensor([[0, 2], [SLOTS, 1], [3, SLOTS], [SLOTS, SLOTS], [2, 0], [1, 3]])
        weight_VK = torch.rand(6, 2)
        x_VD = torch.randn(6, D)
        expected = torch.zeros(6, D)
        for v in range(6):
            for k in range(2):
                if slot_VK[v, k] < SLOTS:
                    expected[v] += weight_VK[v, k] * reference[slot_VK[v, k]](x_VD[v : v + 1])[0]
        torch.testing.assert_close(experts.forward_routes(x_VD, slot_VK, weight_VK), expected)
    stacks = {p.untyped_storage().data_ptr() for p in experts.parameters()}
    matrices = 3 if form == "gated" else sum(isinstance(m, nn.Linear) for m in experts.modules())
    assert len(stacks) == (matrices // SLOTS if form != "gated" else 2) + (
        sum(m.bias is not None for m in experts.modules() if isinstance(m, nn.Linear)) // SLOTS
    )  # one storage per matrix (and per bias), not one per slot


def test_unknown_form_runs_each_module():
    experts, reference = _experts(lambda: nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D)))
    x_QD = torch.randn(7, D)
    with torch.no_grad():
        torch.testing.assert_close(experts(x_QD, [1, 2, 3, 1]), _loop(reference, x_QD, [1, 2, 3, 1]))
        assert experts.stacked_slots(x_QD) is None


def test_writes_rebinding_and_copies_keep_the_stack_right():
    experts, reference = _experts(_mlp)
    splits = [2, 2, 2, 2]
    x_QD = torch.randn(8, D)
    with torch.no_grad():
        experts(x_QD, splits)
        first = experts.stacked_slots(x_QD)
        # an in-place write (loading, replication, migration) lands in the stack
        experts.deepspeed_experts[1].load_state_dict(reference[3].state_dict())
        reference[1].load_state_dict(reference[3].state_dict())
        torch.testing.assert_close(experts(x_QD, splits), _loop(reference, x_QD, splits))
        assert experts.stacked_slots(x_QD) is first
        # a copy of one slot's module holds its own tensors, the size of that slot only
        alone = copy.deepcopy(experts.deepspeed_experts[0])
        assert alone[0].weight.untyped_storage().nbytes() == F * D * 4
        # .to() rebinds the parameters: the stacks are built again, in the new dtype
        experts.to(torch.bfloat16)
        x_bf16 = x_QD.bfloat16()
        out = experts(x_bf16, splits)
        assert experts.stacked_slots(x_bf16) not in (None, first)
        expected = _loop([m.bfloat16() for m in reference], x_bf16, splits)
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
        # a dtype the kernel lacks runs each module
        experts.to(torch.float64)
        assert experts.stacked_slots(x_QD.double()) is None
        torch.testing.assert_close(
            experts(x_QD.double(), splits), _loop([m.double() for m in reference], x_QD.double(), splits)
        )


def test_autograd_runs_through_the_modules_parameters():
    experts, _ = _experts(_mlp)
    x_QD = torch.randn(6, D)
    experts(x_QD, [1, 2, 3, 0]).sum().backward()
    assert all(p.grad is not None for m in experts.deepspeed_experts[:3] for p in m.parameters())


def test_slots_of_mixed_forms_or_misaligned_widths_are_not_stacked():
    assert StackedSlots.build([nn.Linear(D, D), nn.Linear(D, D, bias=False)]) is None
    assert StackedSlots.build([nn.Linear(D, 12).bfloat16() for _ in range(2)]) is None  # 24-byte rows
    assert StackedSlots.build([nn.Linear(D, 12) for _ in range(2)]) is not None  # 48-byte rows


def test_cpu_runs_large_forwards_slot_by_slot(monkeypatch):
    """On CPU the normal path takes the grouped kernel up to CPU_GROUPED_MAX_ROWS_PER_SLOT rows per slot
    (where it was measured faster), the modules above; the result is the same either way."""
    experts, reference = _experts(_mlp)
    calls = []
    original = StackedSlots.__call__
    monkeypatch.setattr(
        StackedSlots, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    bound = CPU_GROUPED_MAX_ROWS_PER_SLOT * SLOTS
    with torch.no_grad():
        for rows, grouped in ((bound, True), (bound + 1, False)):
            splits = [rows // SLOTS] * (SLOTS - 1) + [rows - (SLOTS - 1) * (rows // SLOTS)]
            x_QD = torch.randn(rows, D)
            calls.clear()
            torch.testing.assert_close(experts(x_QD, splits), _loop(reference, x_QD, splits))
            assert bool(calls) == grouped, rows
