"""Read a finished run back: masks, ground truth and Dice rows by image id.

>>> run = open_run("runs/demo")            # doctest: +SKIP
>>> run.mask("img-00310")                   # (H, W) uint8 predicted classes
>>> run.ground_truth("img-00310")           # (H, W) uint32 labels, or None
>>> run.dice("img-00310")                   # list of row dicts, one per class

The run directory may be a local path or an fsspec URL (``open_run("s3://bucket/runs/demo")``).
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr

from segcore import fsio
from segcore.errors import NotFound
from segcore.run.rundir import (dice_dir, instances_path, label_array, masks_path, read_plan, read_run_info,
                                table_dir)
from segcore.collection.store import open_store, read_manifest, store_root
from segcore.collection.versions import current_manifest
from segcore.run.tables import INSTANCE_METRICS_SCHEMA, INSTANCE_SCHEMA, SEAM_SCHEMA, read_dice, read_table


class RunReader:
    """Read-only view of a run directory (path or URL) and the store it segmented."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = os.fspath(run_dir)
        self.info = read_run_info(self.path)
        self.run_id: str = self.info["run_id"]
        self.store = open_store(self.info["store"])
        self._images = store_root(self.store.path)
        self._labels: dict[tuple[str, str], zarr.Array] = {}

    def _label_array(self, location: str, group: str) -> zarr.Array:
        """The full-resolution label array of ``group`` in ``masks.zarr`` or ``instances.zarr``, opened once."""
        if (location, group) not in self._labels:
            self._labels[location, group] = label_array(location, group)
        return self._labels[location, group]

    @cached_property
    def manifest(self) -> pa.Table:
        return read_manifest(self.store.path)

    @cached_property
    def _slots(self) -> dict[str, tuple[str, int, dict[str, Any]]]:
        """Image id -> slot in the groups this run planned: the current version of the image, or, when
        the store gained a newer version this run has not segmented yet, the newest one it has."""
        planned = set(read_plan(self.path).groups)
        slots: dict[str, tuple[str, int, dict[str, Any]]] = {}
        for r in current_manifest(self.manifest).to_pylist():
            if r["group"] in planned:
                slots[r["image_id"]] = (r["group"], r["index"], r)
        older = [r for r in self.manifest.to_pylist() if r["group"] in planned and r["image_id"] not in slots]
        for r in sorted(older, key=lambda r: r["batch"] or 0):
            slots[r["image_id"]] = (r["group"], r["index"], r)
        return slots

    @property
    def image_ids(self) -> list[str]:
        """Ids of every image this run segmented (it has a predicted mask); of an image whose file
        changed in an incremental ingest, the newest version the run has."""
        return sorted(self._slots)

    def _slot(self, image_id: str) -> tuple[str, int, dict[str, Any]]:
        try:
            return self._slots[image_id]
        except KeyError:
            raise NotFound(f"image id {image_id!r} is not in run {self.run_id}") from None

    def record(self, image_id: str) -> dict[str, Any]:
        """The manifest row of the version of ``image_id`` this run has (``status``, ``error``,
        ``source_path``, ...)."""
        return dict(self._slot(image_id)[2])

    def _segmented(self, image_id: str) -> tuple[str, int]:
        """Where the predicted mask of ``image_id`` lies; :class:`NotFound` for an image whose file
        could not be read at ingest (its slot holds no prediction, only background)."""
        g, i, row = self._slot(image_id)
        if row["status"] != "ok":
            raise NotFound(f"image {image_id!r} was not segmented: its file could not be read at ingest "
                           f"({row.get('error') or 'no reason recorded'})")
        return g, i

    def image(self, image_id: str) -> np.ndarray:
        """``(H, W, C)`` raw image as ingested."""
        g, i, _ = self._slot(image_id)
        return self._images[f"images/{g}"][i]

    def mask(self, image_id: str) -> np.ndarray:
        """``(H, W)`` predicted class labels (:class:`NotFound` for an image that could not be read)."""
        g, i = self._segmented(image_id)
        return self._label_array(masks_path(self.path), g)[i]

    def ground_truth(self, image_id: str) -> np.ndarray | None:
        """``(H, W)`` uint32 ground-truth labels, or None when the image has no usable mask."""
        g, i, row = self._slot(image_id)
        if not self.store.has_gt or row["mask_status"] != "ok":
            return None
        return self._images[f"gt/{g}"][i]

    def masks_of(self, image_ids: Sequence[str]) -> np.ndarray:
        """``(N, H, W)`` predicted class labels of ``image_ids`` (of one shape), in that order; the
        consecutive slots of one group (a volume's slices) are read as one slab. :class:`NotFound`
        when one of them could not be read at ingest."""
        for image_id in image_ids:
            self._segmented(image_id)
        return self._stacked(image_ids, lambda g: self._label_array(masks_path(self.path), g))

    def ground_truths_of(self, image_ids: Sequence[str]) -> np.ndarray | None:
        """``(N, H, W)`` ground truth of ``image_ids`` in the smallest unsigned dtype that holds its labels,
        or None when one of them has no usable mask."""
        if not self.store.has_gt or any(self._slot(i)[2]["mask_status"] != "ok" for i in image_ids):
            return None
        return self._stacked(image_ids, lambda g: self._images[f"gt/{g}"], narrow=True)

    def _stacked(self, image_ids: Sequence[str], array_of: Any, *, narrow: bool = False) -> np.ndarray:
        slots = [self._slot(i)[:2] for i in image_ids]
        runs: list[tuple[str, int, int]] = []  # (group, start, stop) of consecutive slots
        for g, i in slots:
            if runs and runs[-1][0] == g and runs[-1][2] == i:
                runs[-1] = (g, runs[-1][1], i + 1)
            else:
                runs.append((g, i, i + 1))
        pieces = []
        for g, a, b in runs:
            piece = array_of(g)[a:b]
            if narrow and piece.size:  # each slab narrowed as read: a volume never sits in memory as uint32
                piece = piece.astype(np.min_scalar_type(int(piece.max())), copy=False)
            pieces.append(piece)
        return np.concatenate(pieces)

    def instances(self, image_id: str) -> np.ndarray:
        """``(H, W)`` uint32 predicted instance ids (instance models only)."""
        g, i = self._segmented(image_id)
        if not fsio.exists(fsio.join(instances_path(self.path), "zarr.json")):
            raise NotFound(f"run {self.run_id} was made by a semantic model and has no instance labels")
        return self._label_array(instances_path(self.path), g)[i]

    def instance_table(self) -> pa.Table:
        """One row per predicted instance (empty for semantic models)."""
        return read_table(table_dir(self.path, "instances"), INSTANCE_SCHEMA)

    def instance_metrics_table(self) -> pa.Table:
        """One row per image evaluated against instance ground truth (empty otherwise)."""
        return read_table(table_dir(self.path, "instance_metrics"), INSTANCE_METRICS_SCHEMA)

    def seam_table(self) -> pa.Table:
        """One row per tiled image of an instance model (see ``SEAM_SCHEMA``); empty otherwise."""
        return read_table(table_dir(self.path, "seams"), SEAM_SCHEMA)

    def dice_table(self) -> pa.Table:
        """The whole Dice table of this run (``run_id`` included)."""
        return read_dice(dice_dir(self.path))

    @cached_property
    def _dice(self) -> pa.Table:
        return self.dice_table()

    @cached_property
    def _unit_groups(self) -> dict[str, str]:
        """Table part (a unit ``unit-00042`` or a tiled image's part ``g001-000003``) -> store group,
        from the run's recorded plan."""
        return read_plan(self.path).part_groups()

    def _current_rows(self, table: pa.Table, image_id: str) -> pa.Table:
        """Rows of ``table`` (``image_id`` and ``unit`` columns) of the current version of ``image_id``.

        An image whose file changed in an incremental ingest has rows of every version, each
        written by the units of its own store group; those of the image's slot (its current
        version, by the rule of :mod:`segcore.collection.versions`, among the groups the run
        planned) are kept.
        """
        group = self._slot(image_id)[0]  # an id that is not in the run raises NotFound
        rows = table.filter(pc.equal(table["image_id"], image_id))
        keep = [self._unit_groups[u] == group for u in rows.column("unit").to_pylist()]
        return rows.filter(pa.array(keep, pa.bool_()))

    def dice(self, image_id: str) -> list[dict[str, Any]]:
        """Dice rows of one image (one per class; of a changed file, its current version), sorted by
        class id; empty if it had no GT."""
        return self._current_rows(self._dice, image_id).sort_by("class_id").to_pylist()


def open_run(run_dir: str | os.PathLike[str]) -> RunReader:
    """Open a run directory written by ``segflow segment`` / ``segflow run``."""
    return RunReader(run_dir)
