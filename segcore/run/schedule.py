"""What remains to do for a run's tiled images, from its plan and its done-records.

The flow asks a :class:`TiledSchedule` which steps to submit and submits them; the bookkeeping
lives here:

- semantic models: every block without a done-record is segmented; an image is finished when a
  block of it was segmented now, or when it has no done-record;
- instance models: every block without a detection record is detected, and so is one whose saved
  objects are gone while its image still needs them (a block of it to detect or paste, or the
  image to finish); a block detected anew changes the instance ids of its image, so every block
  of that image is pasted again; ids are handed out block by block in plan order
  (:func:`first_ids`); a block is pasted from the saved objects of every block that can reach into
  it (:func:`reaching_units`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from segcore.run.context import BlockRecord, DetectRecord, Record
from segcore.run.plan import RunPlan, WorkUnit, image_part


@dataclass(frozen=True)
class ImageJob:
    """One tiled image to finish: its blocks' records and, for instance models, ``(unit name, first id)``
    of each block."""

    group: str
    index: int
    records: tuple[BlockRecord, ...]
    blocks: tuple[tuple[str, int], ...] = ()


def first_ids(units: Sequence[WorkUnit], counts: Mapping[str, int]) -> dict[str, int]:
    """The first instance id of every unit's objects: 1, then running sums, per image in unit order."""
    out: dict[str, int] = {}
    nxt: dict[tuple[str, int], int] = {}
    for u in units:
        key = (u.group, u.start)
        out[u.name] = nxt.get(key, 1)
        nxt[key] = out[u.name] + int(counts[u.name])
    return out


def reaching_units(unit: WorkUnit, units: Sequence[WorkUnit], overlap: int, height: int, width: int
                   ) -> list[WorkUnit]:
    """The units of the same image whose saved objects can reach into ``unit``'s block (their objects
    lie inside their block plus ``overlap``)."""
    return [u for u in units if u.group == unit.group and u.start == unit.start
            and u.window.grow(overlap, height, width).intersects(unit.window)]


class TiledSchedule:
    """The remaining steps of the tiled images of ``plan``.

    Args:
        plan: the run's plan (its tiling must be set when it has block units).
        done: the run's done-records by marker (:func:`segcore.run.rundir.done_records`).
        instance: whether the model is an instance model (two passes per block).
        shapes: ``(height, width)`` of the images of each tiled group.
        saved: instance models: the units whose objects are saved in the run directory
            (:func:`segcore.run.blocks.saved_blocks`); None takes every detection record's as saved.
        left_out: ``(group, index)`` of the tiled images that run no model
            (:func:`segcore.run.units.superseded_tiled_images`).
    """

    def __init__(self, plan: RunPlan, done: Mapping[str, Record], *, instance: bool,
                 shapes: Mapping[str, tuple[int, int]], saved: Collection[str] | None = None,
                 left_out: Collection[tuple[str, int]] = ()) -> None:
        self.plan = plan
        self.left_out = set(left_out)
        #: The blocks that run the model (those of the images left out are not among them).
        self.units = [u for u in plan.units if u.window is not None and (u.group, u.start) not in self.left_out]
        self.done = done
        self.instance = instance
        self.shapes = shapes
        self.saved = saved
        blocks: dict[tuple[str, int], list[WorkUnit]] = {}
        for u in self.units:
            blocks.setdefault((u.group, u.start), []).append(u)
        #: Images whose saved objects are read no more: finished, every block pasted and detected.
        self._complete = {image for image, mine in blocks.items()
                          if f"image-{image_part(*image)}" in done
                          and all(self._block_done(u) and self._recorded(u) for u in mine)}

    def _recorded(self, unit: WorkUnit) -> bool:
        return isinstance(self.done.get(f"{unit.name}.detect"), DetectRecord)

    def _detected(self, unit: WorkUnit) -> bool:
        """A detection record, and its saved objects while its image still needs them (any step of
        the image left to do: a block to detect or paste, or the image to finish)."""
        if not self._recorded(unit):
            return False
        return self.saved is None or unit.name in self.saved or (unit.group, unit.start) in self._complete

    def _block_done(self, unit: WorkUnit) -> bool:
        return isinstance(self.done.get(unit.name), BlockRecord)

    def stats_needed(self) -> list[tuple[str, int]]:
        """Images whose blocks still run the model (and so need the image's normalisation values)."""
        pending = self.to_detect() if self.instance else self.to_segment()
        return sorted({(u.group, u.start) for u in pending})

    def to_segment(self) -> list[WorkUnit]:
        """Semantic models: the blocks to segment."""
        return [u for u in self.units if not self._block_done(u)]

    def to_detect(self) -> list[WorkUnit]:
        """Instance models, first pass: the blocks to detect."""
        return [u for u in self.units if not self._detected(u)]

    def first_ids(self, detections: Mapping[str, DetectRecord]) -> dict[str, int]:
        """First instance id of every block, from the detection records of all blocks."""
        return first_ids(self.units, {u.name: detections[f"{u.name}.detect"].objects for u in self.units})

    def to_paste(self, detections: Mapping[str, DetectRecord], *, redetected: Sequence[WorkUnit]
                 ) -> list[tuple[WorkUnit, list[tuple[str, int]]]]:
        """Instance models, second pass: ``(block, sources)`` for every block to paste: those without a
        done-record and every block of an image with a block in ``redetected``."""
        redo = {(u.group, u.start) for u in redetected}
        firsts = self.first_ids(detections)
        out = []
        for u in self.units:
            if self._block_done(u) and (u.group, u.start) not in redo:
                continue
            h, w = self.shapes[u.group]
            sources = [(v.name, firsts[v.name]) for v in reaching_units(u, self.units, self.plan.tiling.overlap, h, w)]
            out.append((u, sources))
        return out

    def to_finish(self, redone: Sequence[WorkUnit], records: Mapping[str, BlockRecord],
                  detections: Mapping[str, DetectRecord] | None = None) -> list[ImageJob]:
        """Images to finish: those with a block segmented or pasted now (``redone``) and those without a
        done-record. ``records``: the block records of every block (earlier and new)."""
        rerun = {(u.group, u.start) for u in redone}
        firsts = self.first_ids(detections) if self.instance else {}
        jobs = []
        for group, index in self.plan.tiled_images:
            if (group, index) in self.left_out:
                continue
            if (group, index) not in rerun and f"image-{image_part(group, index)}" in self.done:
                continue  # finished by an earlier run: not evaluated (nor published) twice
            mine = self.plan.blocks_of(group, index)
            jobs.append(ImageJob(group=group, index=index, records=tuple(records[u.name] for u in mine),
                                 blocks=tuple((u.name, firsts[u.name]) for u in mine) if firsts else ()))
        return jobs

    def to_leave_out(self) -> list[tuple[str, int]]:
        """The images left out that lack their image done-record (a block of one may have been
        segmented before its newer version came: it is blanked again with the others)."""
        return [(g, i) for g, i in self.plan.tiled_images
                if (g, i) in self.left_out and f"image-{image_part(g, i)}" not in self.done]


def pending_steps(plan: RunPlan, done: Mapping[str, Record]) -> int:
    """How many units of ``plan`` and tiled images have no done-record in ``done``."""
    return (sum(u.name not in done for u in plan.units)
            + sum(f"image-{image_part(g, i)}" not in done for g, i in plan.tiled_images))
