"""Online replication's traffic: the per-interval state exchange and replica weight transfers.

Shape legend: R expert-parallel (EP) ranks, F int64 fields one rank contributes per interval.

- ``gather_fields``: one small all-gather over the EP group of every rank's int64 fields (its
  local expert counts, progress flags, the hash of the plan it is about to serve);
- ``check_same_hash``: every rank learns every rank's plan hash; any difference raises
  PlanMismatchError on every rank, naming the ranks and hashes;
- ``start_transfers``: point-to-point sends/receives of byte chunks inside the EP group, started
  asynchronously (they overlap the forwards that follow) and finished by ``TransferBatch.wait``.
Transfers use the default (world) process group with their own tag, so they never interleave with
the dispatch/combine collectives, which run on the GRACE groups.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ds_grace.comm.groups import GraceGroups

MIGRATION_TAG = 0x6E7
HASH_WORDS = 8
NO_PLAN_HASH = "0" * (8 * HASH_WORDS)  # stands for "no new plan" in a hash exchange


class PlanMismatchError(RuntimeError):
    """Ranks computed different plans from the same aggregated loads."""


def gather_fields(fields_F: torch.Tensor, *, groups: GraceGroups) -> torch.Tensor:
    """fields_RF: every EP rank's int64 fields (one all-gather; all ranks pass the same F). Collective."""
    local = fields_F.to(torch.int64).reshape(-1).contiguous()
    if groups.ep_group is None:
        return local.unsqueeze(0).clone()
    gathered = [torch.empty_like(local) for _ in range(groups.topology.world_size)]
    dist.all_gather(gathered, local, group=groups.ep_group)
    return torch.stack(gathered)


def hash_words(hex_digest: str) -> torch.Tensor:
    """A sha256 hex digest as HASH_WORDS int64 values (32 bits each, so never negative)."""
    if len(hex_digest) != 8 * HASH_WORDS:
        raise ValueError(f"hex_digest ({hex_digest!r}) must have {8 * HASH_WORDS} hex digits")
    return torch.tensor(
        [int(hex_digest[8 * i : 8 * i + 8], 16) for i in range(HASH_WORDS)], dtype=torch.int64
    )


def words_hash(words: Sequence[int] | torch.Tensor) -> str:
    return "".join(f"{int(w):08x}" for w in words)


def raise_on_hash_mismatch(words_RH: torch.Tensor, *, what: str) -> None:
    """Raise PlanMismatchError (on every rank that calls it) unless all rows of words_RH are equal."""
    hashes = [words_hash(row) for row in words_RH]
    if len(set(hashes)) > 1:
        listing = ", ".join(
            f"EP rank {r}: {'none' if h == NO_PLAN_HASH else h[:16]}" for r, h in enumerate(hashes)
        )
        raise PlanMismatchError(
            f"{what}: plan content_hash differs across EP ranks ({listing}); every rank must compute "
            "the same plan from the same aggregated loads, so nothing was switched"
        )


def check_same_hash(hex_digest: str, *, groups: GraceGroups, what: str) -> None:
    """All-gather every rank's plan hash; PlanMismatchError on every rank if any differs. Collective."""
    raise_on_hash_mismatch(gather_fields(hash_words(hex_digest), groups=groups), what=what)


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, stop) of one replica's flat byte image, from EP rank src to EP rank dst."""

    key: tuple[int, int]
    src: int
    dst: int
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass
class TransferBatch:
    """Transfers in flight; ``wait`` blocks until this rank's are done and returns the seconds waited."""

    works: list[Any] = field(default_factory=list)
    keep_alive: list[torch.Tensor] = field(default_factory=list)
    started_at: float = field(default_factory=time.perf_counter)
    bytes_sent: int = 0
    bytes_received: int = 0

    def wait(self) -> float:
        begin = time.perf_counter()
        for work in self.works:
            work.wait()
        self.works.clear()
        self.keep_alive.clear()
        return time.perf_counter() - begin


def start_transfers(
    chunks: Sequence[Chunk],
    *,
    source_bytes: dict[tuple[int, int], torch.Tensor],
    staging_bytes: dict[tuple[int, int], torch.Tensor],
    groups: GraceGroups,
) -> TransferBatch:
    """Start this rank's sends and receives of `chunks` (every rank passes the same list).

    source_bytes[key] is the flat uint8 image this rank sends for a chunk it is the source of;
    staging_bytes[key] the uint8 buffer a chunk it is the destination of lands in. A chunk from a
    rank to itself is a local copy. Sends and receives are posted in list order on every rank, so
    each pair of ranks matches them one to one.
    """
    me = groups.ep_index
    batch = TransferBatch()
    for chunk in chunks:
        if chunk.src == me and chunk.dst == me:
            staging_bytes[chunk.key][chunk.start : chunk.stop].copy_(
                source_bytes[chunk.key][chunk.start : chunk.stop]
            )
        elif chunk.src == me:
            payload = source_bytes[chunk.key][chunk.start : chunk.stop].contiguous()
            batch.keep_alive.append(payload)
            batch.works.append(dist.isend(payload, dst=groups.ep_ranks[chunk.dst], tag=MIGRATION_TAG))
            batch.bytes_sent += chunk.nbytes
        elif chunk.dst == me:
            target = staging_bytes[chunk.key][chunk.start : chunk.stop]
            batch.works.append(dist.irecv(target, src=groups.ep_ranks[chunk.src], tag=MIGRATION_TAG))
            batch.bytes_received += chunk.nbytes
    return batch
