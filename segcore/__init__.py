"""segcore: the Prefect-free library behind segflow (models, checkpoints, IO, metrics, stores).

``segcore.open_run`` (:func:`segcore.run.results.open_run`) is imported on first use, so
``import segcore`` stays light (no zarr, pyarrow or torch).
"""

from __future__ import annotations

from typing import Any

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
    "open_run",
]


def __getattr__(name: str) -> Any:
    if name == "open_run":
        from segcore.run.results import open_run

        return open_run
    raise AttributeError(f"module 'segcore' has no attribute {name!r}")
