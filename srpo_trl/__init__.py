"""Sample-Routed Policy Optimization (SRPO) for TRL."""

from .config import SRPOConfig
from .trainer import SRPOTrainer

__all__ = ["SRPOConfig", "SRPOTrainer"]
__version__ = "0.1.0"
