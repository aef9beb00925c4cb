"""Sample-Routed Policy Optimization (SRPO) for TRL."""

from typing import TYPE_CHECKING

__all__ = ["SRPOConfig", "SRPOTrainer"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import SRPOConfig
    from .trainer import SRPOTrainer


def __getattr__(name: str):
    # Imported on first use, as TRL does: `srpo_trl.tasks` (data and rewards) then loads without TRL's trainer stack.
    if name == "SRPOConfig":
        from .config import SRPOConfig

        return SRPOConfig
    if name == "SRPOTrainer":
        from .trainer import SRPOTrainer

        return SRPOTrainer
    raise AttributeError(f"module 'srpo_trl' has no attribute {name!r}")
