"""Online replication: a live load monitor, deterministic re-planning and replica migration."""

from ds_grace.comm.migration import PlanMismatchError
from ds_grace.online.replan import ReplanResult, predicted_balancedness, replan
from ds_grace.online.replicator import OnlineReplicator, module_bytes, module_from_bytes
from ds_grace.online.schedule import ReplicaCopy, next_chunks, plan_copies

__all__ = [
    "OnlineReplicator",
    "PlanMismatchError",
    "ReplanResult",
    "ReplicaCopy",
    "module_bytes",
    "module_from_bytes",
    "next_chunks",
    "plan_copies",
    "predicted_balancedness",
    "replan",
]
