"""Work units for inference: one unit is one chunk of one store group.

A unit carries only names and index ranges (never arrays), so it can be shipped to any worker.
In a tiled group (large images, see :mod:`segcore.tiling`) a unit is one spatial chunk of one
image: its ``window`` is the unit's core. :func:`check_alignment` proves, before fan-out, that
every unit covers exactly one chunk of the output arrays and that the units cover every pixel, so
no two workers ever write the same chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from segcore.errors import PlanError
from segcore.collection.store import StoreInfo
from segcore.tiling import Window, chunk_windows


@dataclass(frozen=True)
class WorkUnit:
    """Images ``[start, stop)`` of store group ``group``; with a ``window``, that block of one image."""

    unit_id: int
    group: str
    start: int
    stop: int
    window: Window | None = None

    @property
    def name(self) -> str:
        return f"unit-{self.unit_id:05d}"

    @property
    def label(self) -> str:
        """Human-readable name for logs and task-run names."""
        if self.window is not None:
            w = self.window
            return f"{self.name} [{self.group} image {self.start} y {w.y0}-{w.y1 - 1} x {w.x0}-{w.x1 - 1}]"
        return f"{self.name} [{self.group} images {self.start}-{self.stop - 1}]"

    @property
    def n_images(self) -> int:
        return self.stop - self.start


def plan_units(store: StoreInfo, *, tiled: bool = True) -> list[WorkUnit]:
    """One unit per chunk of every group, numbered in group order.

    A tiled group gives one unit per spatial chunk of each image (row by row); ``tiled=False``
    treats its images whole instead (one unit per image; the output arrays must then be chunked
    by whole images too).
    """
    units: list[WorkUnit] = []
    for g in store.groups:
        for c in range(g.n_chunks):
            start, stop = g.chunk_range(c)
            if g.tile and tiled:
                for w in chunk_windows(g.height, g.width, g.tile):
                    units.append(WorkUnit(unit_id=len(units), group=g.name, start=start, stop=stop, window=w))
            else:
                units.append(WorkUnit(unit_id=len(units), group=g.name, start=start, stop=stop))
    return units


def check_alignment(units: Sequence[WorkUnit], *, chunks: Mapping[str, Sequence[int]],
                    counts: Mapping[str, Sequence[int]]) -> None:
    """Refuse a plan whose units are not exactly the output arrays' chunks.

    Args:
        units: the plan.
        chunks: group name -> ``(images, height, width)`` of one chunk of the output array.
        counts: group name -> ``(images, height, width)`` of the output array.

    Raises:
        PlanError: a unit straddles chunks, overlaps another, or some images or pixels have no unit.
    """
    covered: dict[str, list[tuple[int, int]]] = {}
    blocks: dict[tuple[str, int], set[Window]] = {}
    for u in units:
        if u.group not in chunks:
            raise PlanError(f"{u.label}: the output has no array for group {u.group!r}")
        if u.group not in counts:
            raise PlanError(f"{u.label}: no image count for group {u.group!r}")
        (k, ch, cw), (n, height, width) = chunks[u.group], counts[u.group]
        if u.window is not None:
            w = u.window
            if (k != 1 or u.stop != u.start + 1 or u.stop > n or w.y0 % ch or w.x0 % cw
                    or w.y1 != min(w.y0 + ch, height) or w.x1 != min(w.x0 + cw, width)):
                raise PlanError(f"{u.label} is not aligned to output chunks of {ch} x {cw} pixels; two workers "
                                "could write the same chunk. Re-create the run directory for this store.")
            seen = blocks.setdefault((u.group, u.start), set())
            if w in seen:
                raise PlanError(f"{u.label}: two units write the same block")
            seen.add(w)
            if len(seen) == 1:
                covered.setdefault(u.group, []).append((u.start, u.stop))
            continue
        if ch != height or cw != width:
            raise PlanError(f"{u.label} covers whole images but the output of group {u.group!r} is chunked in "
                            f"{ch} x {cw} blocks; re-create the run directory with the same tiling")
        if u.stop <= u.start or u.start % k or u.stop != min(u.start + k, n):
            raise PlanError(
                f"{u.label} is not aligned to output chunks of {k} images (count {n}); two workers could write "
                "the same chunk. Re-create the run directory for this store."
            )
        covered.setdefault(u.group, []).append((u.start, u.stop))
    for (group, index), seen in blocks.items():
        _, ch, cw = chunks[group]
        _, height, width = counts[group]
        expected = math.ceil(height / ch) * math.ceil(width / cw)
        if len(seen) != expected:
            raise PlanError(f"group {group!r} image {index}: {len(seen)} unit(s) cover its {expected} blocks")
    counts = {g: c[0] for g, c in counts.items()}
    for group, n in counts.items():
        spans = sorted(covered.get(group, []))
        expected = 0
        for s, e in spans:
            if s != expected:
                raise PlanError(f"group {group!r}: images {expected}..{s - 1} have no unit or units overlap at {s}")
            expected = e
        if expected != n:
            raise PlanError(f"group {group!r}: images {expected}..{n - 1} have no unit")
