"""Work units for inference: one unit is one chunk of one store group.

A unit carries only names and index ranges (never arrays), so it can be shipped to any worker.
:func:`check_alignment` proves, before fan-out, that every unit covers exactly one chunk of the
output arrays, so no two workers ever write the same chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from segcore.errors import PlanError
from segcore.store import StoreInfo


@dataclass(frozen=True)
class WorkUnit:
    """Images ``[start, stop)`` of store group ``group``."""

    unit_id: int
    group: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"unit-{self.unit_id:05d}"

    @property
    def label(self) -> str:
        """Human-readable name for logs and task-run names."""
        return f"{self.name} [{self.group} images {self.start}-{self.stop - 1}]"

    @property
    def n_images(self) -> int:
        return self.stop - self.start


def plan_units(store: StoreInfo) -> list[WorkUnit]:
    """One unit per chunk of every group, numbered in group order."""
    units: list[WorkUnit] = []
    for g in store.groups:
        for c in range(g.n_chunks):
            start, stop = g.chunk_range(c)
            units.append(WorkUnit(unit_id=len(units), group=g.name, start=start, stop=stop))
    return units


def check_alignment(units: Sequence[WorkUnit], *, chunks: Mapping[str, int], counts: Mapping[str, int]) -> None:
    """Refuse a plan whose units are not exactly the output arrays' chunks.

    Args:
        units: the plan.
        chunks: group name -> images per chunk of the output array.
        counts: group name -> number of images in the output array.

    Raises:
        PlanError: a unit straddles chunks, overlaps another, or some images have no unit.
    """
    covered: dict[str, list[tuple[int, int]]] = {}
    for u in units:
        if u.group not in chunks:
            raise PlanError(f"{u.label}: the output has no array for group {u.group!r}")
        if u.group not in counts:
            raise PlanError(f"{u.label}: no image count for group {u.group!r}")
        k, n = chunks[u.group], counts[u.group]
        if u.stop <= u.start or u.start % k or u.stop != min(u.start + k, n):
            raise PlanError(
                f"{u.label} is not aligned to output chunks of {k} images (count {n}); two workers could write "
                "the same chunk. Re-create the run directory for this store."
            )
        covered.setdefault(u.group, []).append((u.start, u.stop))
    for group, n in counts.items():
        spans = sorted(covered.get(group, []))
        expected = 0
        for s, e in spans:
            if s != expected:
                raise PlanError(f"group {group!r}: images {expected}..{s - 1} have no unit or units overlap at {s}")
            expected = e
        if expected != n:
            raise PlanError(f"group {group!r}: images {expected}..{n - 1} have no unit")
