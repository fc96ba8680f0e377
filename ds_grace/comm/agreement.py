"""Comparing what every rank gathered at the start-up handshake (pure): one line per field whose value
differs, naming every rank's value, and per layout problem (ranks of one node on several hosts).

The fields are plain data ({name: JSON-able value}) built above comm/ (ds_grace.fingerprint); nothing here
knows what they mean.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ds_grace.comm.collectives import DistributedSetupError


class RankMismatchError(DistributedSetupError):
    """Ranks would serve with different settings, plans, layouts, versions or launch arguments; raised on
    every rank."""


def _ranks_text(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "ranks 0-2, 5"."""
    spans: list[str] = []
    start = prev = ranks[0]
    for rank in [*ranks[1:], None]:
        if rank is not None and rank == prev + 1:
            prev = rank
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if rank is not None:
            start = prev = rank
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def disagreements(
    fingerprints: Sequence[Mapping[str, Any]], identities: Sequence[Mapping[str, Any]]
) -> list[str]:
    """One line per field whose value differs across ranks (values grouped by rank), and per layout
    problem: a rank whose own rank number is not its place, ranks of one node on different hosts."""
    problems = []
    fields = sorted({name for fp in fingerprints for name in fp})
    for name in fields:
        by_value: dict[str, list[int]] = {}
        for rank, fp in enumerate(fingerprints):
            shown = _shown(fp[name]) if name in fp else "(unset)"
            by_value.setdefault(shown, []).append(rank)
        if len(by_value) > 1:
            listing = "; ".join(f"{value} on {_ranks_text(ranks)}" for value, ranks in by_value.items())
            problems.append(f"{name} differs: {listing}")
    for place, identity in enumerate(identities):
        if identity.get("rank") != place:
            problems.append(f"rank {place} reports rank number {identity.get('rank')!r}")
    hosts_by_node: dict[int, dict[str, list[int]]] = {}
    for place, identity in enumerate(identities):
        hosts_by_node.setdefault(identity["node"], {}).setdefault(str(identity["host"]), []).append(place)
    for node, hosts in sorted(hosts_by_node.items()):
        if len(hosts) > 1:
            listing = "; ".join(f"{host} has {_ranks_text(ranks)}" for host, ranks in hosts.items())
            problems.append(
                f"node {node} of the topology spans several hosts ({listing}): grace.topology does not "
                "match how the launcher placed the ranks"
            )
    return problems


def mismatch_error(problems: Sequence[str]) -> RankMismatchError:
    return RankMismatchError(
        "ranks disagree on what they serve with, so no rank serves: "
        + " | ".join(problems)
        + ". Give every node the same ds_config, plan, launch arguments and package versions"
    )
