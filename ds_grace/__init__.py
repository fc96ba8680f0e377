"""ds_grace: GRACE-MoE locality-aware expert placement and communication for DeepSpeed-MoE inference."""

from typing import Any

from ds_grace.config import GraceConfig, GraceConfigError, load_ds_config
from ds_grace.topology import Topology

__version__ = "0.1.0"

__all__ = [
    "GraceConfig",
    "GraceConfigError",
    "Topology",
    "init_inference",
    "load_ds_config",
    "shutdown",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # init_inference pulls in torch and DeepSpeed; planning-only users should not pay for that.
    if name == "init_inference":
        from ds_grace.inference import init_inference

        return init_inference
    if name == "shutdown":  # every rank, last: leave the process group together (exit_code=N: then end)
        from ds_grace.comm.collectives import shutdown_distributed

        return shutdown_distributed
    raise AttributeError(f"module 'ds_grace' has no attribute {name!r}")
