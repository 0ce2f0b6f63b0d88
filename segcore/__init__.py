"""segcore: the Prefect-free library behind segflow (models, checkpoints, IO, metrics, stores)."""

from segcore.errors import (
    CheckpointError,
    ConfigError,
    ImageReadError,
    NotFound,
    PlanError,
    SegflowError,
    StoreError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ImageReadError",
    "NotFound",
    "PlanError",
    "SegflowError",
    "StoreError",
    "__version__",
]
