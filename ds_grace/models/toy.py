"""A small deterministic MoE model built on DeepSpeed's MoE layer: the workload of tests and demos.

Shape legend: T tokens, D hidden, F expert hidden, E experts, K top-k.

Every parameter is drawn from a generator seeded by (seed, layer, part, index), so every rank builds
identical dense weights and global expert e has the same weights wherever it lives: the ep_size=1
model holding all experts is the single-process reference of any expert-parallel shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from deepspeed.moe.layer import MoE
from torch import nn

_DENSE_PART = 0
_EXPERT_PART = 1
_GATE_PART = 2


@dataclass(frozen=True)
class ToyMoEConfig:
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_experts: int = 8
    k: int = 2
    num_layers: int = 2
    ep_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for field_name in ("hidden_size", "ffn_hidden_size", "num_experts", "num_layers", "ep_size"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ToyMoEConfig.{field_name} ({value!r}) must be an integer >= 1")
        if self.k not in (1, 2):
            raise ValueError(f"ToyMoEConfig.k ({self.k!r}) must be 1 or 2 (DeepSpeed's MoE layer gates)")
        if self.k > self.num_experts:
            raise ValueError(f"ToyMoEConfig.k ({self.k}) must be <= num_experts ({self.num_experts})")
        if self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"ToyMoEConfig.num_experts ({self.num_experts}) must be divisible by ep_size ({self.ep_size})"
            )

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(part) for part in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _fill_(module: nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter of `module` (in registration order) with draws from `generator`."""
    with torch.no_grad():
        for submodule in module.modules():
            if isinstance(submodule, nn.Linear):
                fan_in = submodule.in_features
                submodule.weight.copy_(torch.randn(submodule.weight.shape, generator=generator) / fan_in**0.5)
                if submodule.bias is not None:
                    submodule.bias.copy_(0.1 * torch.randn(submodule.bias.shape, generator=generator))
            elif isinstance(submodule, nn.LayerNorm):
                submodule.weight.copy_(1.0 + 0.1 * torch.randn(submodule.weight.shape, generator=generator))
                submodule.bias.copy_(0.1 * torch.randn(submodule.bias.shape, generator=generator))


def _expert_mlp(hidden_size: int, ffn_hidden_size: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(hidden_size, ffn_hidden_size), nn.GELU(), nn.Linear(ffn_hidden_size, hidden_size)
    )


class ToyMoEBlock(nn.Module):
    """x + dense(norm(x)), then h + MoE(norm(h))."""

    def __init__(self, config: ToyMoEConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.dense_norm = nn.LayerNorm(hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.moe_norm = nn.LayerNorm(hidden)
        # Deterministic gating: no RTS, no Gumbel-sampled second expert, no noisy gate.
        self.moe = MoE(
            hidden,
            _expert_mlp(hidden, config.ffn_hidden_size),
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=config.k,
            noisy_gate_policy=None,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )

    def forward(self, x_TD: torch.Tensor, used_token_T: torch.Tensor | None = None) -> torch.Tensor:
        h_TD = x_TD + torch.tanh(self.dense(self.dense_norm(x_TD)))
        moe_TD, _, _ = self.moe(self.moe_norm(h_TD), used_token_T)
        return h_TD + moe_TD


class ToyMoEModel(nn.Module):
    """`num_layers` ToyMoEBlocks over hidden vectors (no embedding): forward(x_TD) -> y_TD.

    `ep_rank` selects which global experts this rank's MoE layers hold (slot j of ep rank q is expert
    q * num_local_experts + j); it must match the expert-parallel group the layers are later wired to.
    """

    def __init__(self, config: ToyMoEConfig, *, ep_rank: int = 0) -> None:
        super().__init__()
        if not 0 <= ep_rank < config.ep_size:
            raise ValueError(f"ep_rank ({ep_rank}) must be in [0, ep_size={config.ep_size})")
        self.config = config
        self.ep_rank = ep_rank
        self.blocks = nn.ModuleList(ToyMoEBlock(config) for _ in range(config.num_layers))
        self._init_weights()

    @property
    def local_expert_ids(self) -> list[int]:
        first = self.ep_rank * self.config.num_local_experts
        return list(range(first, first + self.config.num_local_experts))

    def _init_weights(self) -> None:
        seed = self.config.seed
        for layer, block in enumerate(self.blocks):
            dense_generator = _generator(seed, layer, _DENSE_PART)
            for part in (block.dense_norm, block.dense, block.moe_norm):
                _fill_(part, dense_generator)
            _fill_(block.moe.deepspeed_moe.gate, _generator(seed, layer, _GATE_PART))
            experts = block.moe.deepspeed_moe.experts.deepspeed_experts
            for expert, expert_id in zip(experts, self.local_expert_ids, strict=True):
                _fill_(expert, _generator(seed, layer, _EXPERT_PART, expert_id))

    def forward(self, x_TD: torch.Tensor, used_token_T: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x_TD = block(x_TD, used_token_T)
        return x_TD


def toy_batch(num_tokens: int, hidden_size: int, *, seed: int = 0, skew: float = 0.0) -> torch.Tensor:
    """Hidden vectors x_TD; with skew > 0 most tokens sit near a few prototypes (repeated content).

    Prototype p is drawn with probability proportional to 1 / (p + 1)^2, so routing concentrates on
    the experts the first prototypes prefer: the load skew that makes capacity drop routes.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens ({num_tokens}) must be >= 0")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew ({skew}) must be in [0, 1]")
    generator = _generator(seed, 1_000_003)
    noise_TD = torch.randn(num_tokens, hidden_size, generator=generator)
    num_prototypes = 4
    prototypes_PD = torch.randn(num_prototypes, hidden_size, generator=generator)
    weights_P = 1.0 / torch.arange(1, num_prototypes + 1, dtype=torch.float64) ** 2
    if num_tokens == 0:
        return noise_TD
    prototype_T = torch.multinomial(weights_P, num_tokens, replacement=True, generator=generator)
    return (1.0 - skew) * noise_TD + skew * (prototypes_PD[prototype_T] + 0.3 * noise_TD)
