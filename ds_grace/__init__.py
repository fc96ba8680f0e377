"""ds_grace: GRACE-MoE locality-aware expert placement and communication for DeepSpeed-MoE inference."""

from ds_grace.config import GraceConfig, GraceConfigError, load_ds_config
from ds_grace.topology import Topology

__version__ = "0.1.0"

__all__ = ["GraceConfig", "GraceConfigError", "Topology", "load_ds_config", "__version__"]
