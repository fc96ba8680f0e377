"""What every rank must agree on before serving, as plain data, and how disagreements are told.

``run_fingerprint(checked)`` is a flat {field: value} of everything that changes the collectives or the
math of a launch: the serving mode, every grace setting that is used in that mode (grace.vanilla.* for
vanilla, all other sections for GRACE, grace.replication.online.* included), the plan's content hash, the
topology and world size, the dtype and every key of the DeepSpeed part (moe.ep_size as resolved), and the
ds_grace, DeepSpeed, torch and transformers versions. ``launch_fingerprint(fields)`` adds a launch's
own fields (launch/generate.py's prompts, token counts, batch shape, new tokens, sampling) as
``launch.*``. Not in it, because ranks may differ there safely: the paths grace.plan.path and
grace.profile.trace (their content is in the plan hash), profile.tokens, communication.timeout_s and
DeepSpeed's path keys (checkpoint, base_dir, save_mp_checkpoint_path).

``rank_identity(checked)`` is what only this rank knows: its rank and host. ``disagreements`` compares the
gathered fingerprints and identities (pure) and returns one line per problem, naming the field and every
rank's value (ds_grace.comm.agreement); the collective that gathers them is
ds_grace.comm.collectives.check_ranks_agree, which receives the plain dicts built here.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

# re-exported: comparing the gathered fingerprints is comm's (ds_grace.comm.agreement)
from ds_grace.comm.agreement import RankMismatchError as RankMismatchError
from ds_grace.comm.agreement import disagreements as disagreements

if TYPE_CHECKING:
    from ds_grace.preflight import Checked

# grace fields ranks may set differently: paths whose content the plan hash covers, and timeouts
LOCAL_FIELDS = frozenset(
    {"grace.plan.path", "grace.profile.trace", "grace.profile.tokens", "grace.communication.timeout_s"}
)

# DeepSpeed keys that are paths: a checkpoint folder may sit elsewhere on every node
LOCAL_DEEPSPEED_PREFIXES = ("ds_config.checkpoint", "ds_config.base_dir", "ds_config.save_mp_checkpoint_path")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key in sorted(value, key=str):
            _flatten(f"{prefix}.{key}", value[key], out)
    else:
        out[prefix] = value


def _versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    import ds_grace

    return {
        "versions.ds_grace": ds_grace.__version__,
        "versions.deepspeed": deepspeed.__version__,
        "versions.torch": torch.__version__,
        "versions.transformers": transformers.__version__,
    }


def run_fingerprint(checked: Checked) -> dict[str, Any]:
    """The fields every rank of this launch must hold the same values of (see the module doc)."""
    grace = checked.grace
    mode = "grace" if grace.enabled else "vanilla"
    settings: dict[str, Any] = {}
    _flatten("grace", grace.model_dump(mode="json"), settings)
    if mode == "grace":
        settings = {k: v for k, v in settings.items() if not k.startswith("grace.vanilla.")}
    else:
        settings = {
            k: v for k, v in settings.items() if k.startswith("grace.vanilla.") or k == "grace.enabled"
        }
    fields: dict[str, Any] = {"mode": mode}
    fields.update({k: v for k, v in settings.items() if k not in LOCAL_FIELDS})
    fields["plan.content_hash"] = checked.plan.content_hash if checked.plan is not None else None
    fields["world_size"] = checked.world_size
    fields["topology"] = f"{checked.topology.num_nodes}x{checked.topology.gpus_per_node}"
    fields["dtype"] = str(checked.dtype).removeprefix("torch.")
    deepspeed_part: dict[str, Any] = {}
    _flatten("ds_config", checked.ds_config, deepspeed_part)
    fields.update(
        {
            k: json.dumps(v, sort_keys=True)
            for k, v in deepspeed_part.items()
            if not k.startswith(LOCAL_DEEPSPEED_PREFIXES)
        }
    )
    fields.update(_versions())
    return fields


def launch_fingerprint(fields: Mapping[str, Any] | None) -> dict[str, Any]:
    """A launch's own fields every rank must pass the same of (launch/generate.py: prompts, their token
    counts, new tokens, batch shape, sampling), as ``launch.<name>`` (nested mappings flattened)."""
    flat: dict[str, Any] = {}
    for name, value in (fields or {}).items():
        _flatten(f"launch.{name}", value, flat)
    return flat


def rank_identity(checked: Checked) -> dict[str, Any]:
    """This rank's own place: its rank, the node the topology puts it on, the host and process it runs in."""
    return {
        "rank": checked.rank,
        "node": checked.topology.node_of(checked.rank),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
