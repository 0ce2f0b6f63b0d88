"""Dask worker preload of the chaos tests (``distributed.worker.preload``): no change to what is
computed, only when.

- every write through :mod:`segcore.fsio` stays under its temporary name for
  ``SEGFLOW_CHAOS_WRITE_DELAY_S`` seconds before the rename, so that a SIGKILL lands mid-write
  (Parquet parts, done-records) and leaves the temporary file behind, as a real crash would;
- every start of a work unit and every finished temporary file is noted in ``SEGFLOW_CHAOS_LOG``
  (one line each, appended), so a test counts the units computed more than once;
- a work unit that starts while the file ``SEGFLOW_CHAOS_HOLD`` exists waits until it is removed,
  so that a test holds a run mid-way for as long as it needs, however loaded the machine.

Loaded at worker start, before the tasks module is imported, so the tasks call the wrapper.
"""

from __future__ import annotations

import contextlib
import os
import time

import segcore.run.units as units
from segcore import fsio

_DELAY = float(os.environ.get("SEGFLOW_CHAOS_WRITE_DELAY_S", "0"))
_LOG = os.environ.get("SEGFLOW_CHAOS_LOG")
_HOLD = os.environ.get("SEGFLOW_CHAOS_HOLD")


def _note(text: str) -> None:
    if _LOG:
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {text}\n")


def install() -> None:
    """Wrap the writer and the unit function once (Dask may execute a preload file more than once)."""
    if getattr(fsio.atomic_path, "chaos", False):
        return
    atomic_path, segment_unit = fsio.atomic_path, units.segment_unit

    @contextlib.contextmanager
    def slow_atomic_path(dest):
        with atomic_path(dest) as tmp:
            yield tmp
            _note(f"written {tmp}")
            time.sleep(_DELAY)  # whole, but not yet renamed: a kill now leaves it behind

    def noted_segment_unit(ctx, unit):
        _note(f"start {unit.name}")
        while _HOLD and os.path.exists(_HOLD):
            time.sleep(0.05)
        return segment_unit(ctx, unit)

    slow_atomic_path.chaos = True
    fsio.atomic_path = slow_atomic_path
    units.segment_unit = noted_segment_unit


install()
