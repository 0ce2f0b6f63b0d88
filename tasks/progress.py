"""Progress of a running stage, reported from inside tasks."""

from __future__ import annotations

import logging


def report(stage: str, done: int, total: int, message: str = "") -> None:
    """Report that ``done`` of ``total`` steps of ``stage`` are finished (logged on ``segflow.progress``)."""
    logging.getLogger("segflow.progress").info("%s: %d/%d %s", stage, done, total, message)
