"""The transport seam: how rows travel between the ranks of one group.

Two operations cover every round of dispatch and combine:
- ``exchange(send_rows, send_counts, recv_counts, group)``: an uneven all-to-all; rows are grouped
  by peer, counts are host integers (known from the header round);
- ``exchange_fixed(send_rows, group)``: every peer gets the same number of rows (the header round
  and the low-latency buffers), so no count is needed anywhere.

``SparseTransport`` is torch.distributed's ``all_to_all_single`` (gloo or NCCL) with explicit
split sizes; ``DeepSpeedTransport`` is DeepSpeed's padded all-to-all (``sharded_moe._AllToAll``,
what the vanilla DeepSpeed-MoE baseline sends), which only has the fixed form: uneven rounds pad
each peer's block to a capacity fixed at construction, as DeepSpeed does. A field kernel (DeepEP,
NCCL EP) is one more class with these two methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist


class Transport(Protocol):
    def exchange(
        self,
        send_rows: torch.Tensor,
        send_counts: Sequence[int],
        recv_counts: Sequence[int],
        group: Any,
        *,
        while_in_flight: Callable[[], None] | None = None,
    ) -> torch.Tensor: ...

    def exchange_fixed(self, send_rows: torch.Tensor, group: Any) -> torch.Tensor: ...


class SparseTransport:
    """Only real rows travel: ``all_to_all_single`` with explicit split sizes."""

    def exchange(
        self,
        send_rows: torch.Tensor,
        send_counts: Sequence[int],
        recv_counts: Sequence[int],
        group: Any,
        *,
        while_in_flight: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        out = send_rows.new_empty((int(sum(recv_counts)), *send_rows.shape[1:]))
        work = dist.all_to_all_single(
            out,
            send_rows.contiguous(),
            output_split_sizes=list(recv_counts),
            input_split_sizes=list(send_counts),
            group=group,
            async_op=while_in_flight is not None,
        )
        if while_in_flight is not None:
            while_in_flight()
            work.wait()
        return out

    def exchange_fixed(self, send_rows: torch.Tensor, group: Any) -> torch.Tensor:
        out = torch.empty_like(send_rows)
        dist.all_to_all_single(out, send_rows.contiguous(), group=group)
        return out


class DeepSpeedTransport:
    """DeepSpeed's padded all-to-all: equal blocks per peer (``deepspeed.moe.sharded_moe._AllToAll``).

    An uneven round pads every peer's block to `capacity` rows (every rank must pass the same);
    a peer's count beyond it is an error raised before the collective, never a drop."""

    def __init__(self, *, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity ({capacity}) must be >= 0")
        self.capacity = capacity

    def exchange(
        self,
        send_rows: torch.Tensor,
        send_counts: Sequence[int],
        recv_counts: Sequence[int],
        group: Any,
        *,
        while_in_flight: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        peers, cap = len(send_counts), self.capacity
        if max([*send_counts, *recv_counts], default=0) > cap:
            raise ValueError(
                f"a peer's row count ({max([*send_counts, *recv_counts])}) exceeds the padded all-to-all's "
                f"capacity ({cap}) rows per peer"
            )
        padded = send_rows.new_zeros((peers, cap, *send_rows.shape[1:]))
        for peer, block in enumerate(send_rows.split(list(send_counts))):
            padded[peer, : block.shape[0]] = block
        received = self.exchange_fixed(padded.reshape(peers * cap, *send_rows.shape[1:]), group)
        if while_in_flight is not None:
            while_in_flight()
        blocks = received.view(peers, cap, *send_rows.shape[1:])
        return torch.cat([blocks[peer, :count] for peer, count in enumerate(recv_counts)])

    def exchange_fixed(self, send_rows: torch.Tensor, group: Any) -> torch.Tensor:
        from deepspeed.moe.sharded_moe import _AllToAll

        return _AllToAll.apply(group, send_rows.contiguous())
