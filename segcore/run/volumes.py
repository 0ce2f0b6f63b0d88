"""Per-volume evaluation of a finished run: 3-D Dice, IoU, HD95 and ASSD per volume and class.

A run scores every slice as an image (the Dice table, one row per image and class). This module
scores whole volumes. The members of a volume are

- the slices of an ingested volume file (manifest rows with a ``volume_id``; spacing from the
  file), or
- 2-D images grouped by a regular expression on their image ids (``volume_pattern``): the
  volume's id is the expression's first group (or, without groups, the whole match), its slices
  are the matching images in natural id order (``z9`` before ``z10``), and the spacing is unknown (1
  per pixel, no unit).

The metrics are those of :func:`segcore.metrics.surface.volume_metrics`, on the stacked
``(D, H, W)`` prediction and ground truth, with the volume's ``(z, y, x)`` spacing; their empty
policies are stated there. A volume without usable ground truth on every slice, or whose slices
do not stack, is a row with ``status="error"`` and the reason; the others go on. The table is
written to ``RUN_DIR/volumes/run_id=RUN_ID/`` (one Parquet part per batch of volumes) and read back with
:func:`read_volume_table`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from segcore import fsio
from segcore.collection.grouping import compile_pattern, group_of, natural_key
from segcore.errors import ConfigError
from segcore.metrics.surface import volume_metrics
from segcore.run.results import RunReader
from segcore.run.rundir import table_dir
from segcore.run.tables import read_table, write_part

log = logging.getLogger(__name__)

VOLUME_SCHEMA = pa.schema([
    ("volume_id", pa.string()),
    ("class_id", pa.int32()),
    ("class_name", pa.string()),
    ("slices", pa.int64()),
    ("tp", pa.int64()),
    ("fp", pa.int64()),
    ("fn", pa.int64()),
    ("dice", pa.float64()),
    ("iou", pa.float64()),
    ("empty_gt", pa.bool_()),
    ("empty_pred", pa.bool_()),
    ("hd95", pa.float64()),
    ("assd", pa.float64()),
    ("surface_status", pa.string()),
    ("spacing_z", pa.float64()),
    ("spacing_y", pa.float64()),
    ("spacing_x", pa.float64()),
    ("spacing_unit", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("model", pa.string()),
    ("checkpoint_sha256", pa.string()),
])


@dataclass(frozen=True)
class Volume:
    """One volume of a run: its id, its slices' image ids in order, and its ``(z, y, x)`` spacing."""

    volume_id: str
    slices: tuple[str, ...]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unit: str = ""


def find_volumes(rows: Iterable[dict[str, Any]], *, pattern: str | None = None) -> list[Volume]:
    """The volumes among manifest ``rows`` (the current versions of a run's images): ingested
    volumes by ``volume_id`` in slice order, and 2-D images grouped by ``pattern``
    (:mod:`segcore.collection.grouping`: first group or whole match, ids in natural order)."""
    regex = compile_pattern(pattern, what="--volume-pattern") if pattern else None
    members: dict[str, list[tuple[tuple, dict[str, Any]]]] = {}
    for r in rows:
        if r.get("volume_id"):
            members.setdefault(r["volume_id"], []).append(((int(r["slice"]),), r))
        elif regex is not None and (key := group_of(regex, r["image_id"])) is not None:
            members.setdefault(key, []).append((natural_key(r["image_id"]), r))
    out = []
    for vid, items in sorted(members.items()):
        items.sort(key=lambda t: t[0])
        first = items[0][1]
        ingested = bool(first.get("volume_id"))
        spacing = tuple(float(first.get(f"spacing_{a}") or 1.0) for a in "zyx") if ingested else (1.0,) * 3
        out.append(Volume(volume_id=vid, slices=tuple(r["image_id"] for _, r in items), spacing=spacing,  # type: ignore[arg-type]
                          unit=(first.get("spacing_unit") or "") if ingested else ""))
    return out


def check_volume_pattern(rows: Iterable[dict[str, Any]], pattern: str | None) -> None:
    """Raise :class:`ConfigError` when ``pattern`` (``--volume-pattern``) groups none of the 2-D
    images among manifest ``rows`` into a volume (it is searched in each image id): a run would
    otherwise end with no volume scored and nothing said."""
    if not pattern:
        return
    regex = compile_pattern(pattern, what="--volume-pattern")
    flat = [r["image_id"] for r in rows if not r.get("volume_id")]
    if flat and not any(group_of(regex, image_id) is not None for image_id in flat):
        raise ConfigError(f"--volume-pattern {pattern!r} matches none of the store's {len(flat)} 2-D image ids "
                          f"(e.g. {flat[0]!r}); fix the pattern (searched in the image id; its first capture group "
                          "names the volume)")


def unreadable_slices(run: RunReader, volume: Volume) -> str | None:
    """Why ``volume`` has no prediction (slices whose file could not be read at ingest), or None."""
    bad = [r for r in map(run.record, volume.slices) if r["status"] != "ok"]
    if not bad:
        return None
    what = "its file" if volume.slices and run.record(volume.slices[0]).get("volume_id") else \
        f"{len(bad)} of its {len(volume.slices)} slice(s)"
    return f"{what} could not be read at ingest ({bad[0].get('error') or 'no reason recorded'}); not segmented"


def stack_volume(run: RunReader, volume: Volume) -> tuple[np.ndarray, np.ndarray | None]:
    """``(D, H, W)`` predicted classes and ground truth (None when a slice has none) of ``volume``."""
    return run.masks_of(volume.slices), run.ground_truths_of(volume.slices)


def volume_rows(run: RunReader, volume: Volume) -> list[dict[str, Any]]:
    """The rows of ``volume`` (see :data:`VOLUME_SCHEMA`): one per class, or one error row."""
    model = run.info["model"]
    names = list(model.get("class_names") or [])
    base = {"volume_id": volume.volume_id, "slices": len(volume.slices), "spacing_z": volume.spacing[0],
            "spacing_y": volume.spacing[1], "spacing_x": volume.spacing[2], "spacing_unit": volume.unit or None,
            "model": model.get("arch"), "checkpoint_sha256": run.info["checkpoint_sha256"]}
    unread = unreadable_slices(run, volume)
    if unread:
        return [dict(base, status="error", error=unread)]
    try:
        pred, gt = stack_volume(run, volume)
    except ValueError as exc:  # slices of different shapes
        return [dict(base, status="error", error=f"its slices do not stack into a volume: {exc}")]
    if gt is None:
        why = {r.get("mask_error") for r in map(run.record, volume.slices) if r["mask_status"] != "ok"} - {None}
        return [dict(base, status="error", error="not every slice has usable ground truth"
                     + (f" ({'; '.join(sorted(why))})" if why else "") + "; nothing to score")]
    if names and int(gt.max()) >= len(names):  # as the slices' rows: never a class the model lacks
        return [dict(base, status="error", error=f"its ground truth holds label {int(gt.max())} but the model has "
                     f"{len(names)} classes (labels 0-{len(names) - 1}); nothing to score")]
    num_classes = max(len(names), int(pred.max()) + 1, int(gt.max()) + 1)
    m = volume_metrics(pred, gt, num_classes=num_classes, spacing=volume.spacing)
    return [dict(base, class_id=int(c), class_name=names[c] if c < len(names) else f"class_{c}", tp=int(m["tp"][c]),
                 fp=int(m["fp"][c]), fn=int(m["fn"][c]), dice=float(m["dice"][c]), iou=float(m["iou"][c]),
                 empty_gt=bool(m["empty_gt"][c]), empty_pred=bool(m["empty_pred"][c]), hd95=float(m["hd95"][c]),
                 assd=float(m["assd"][c]), surface_status=str(m["surface_status"][c]), status="ok", error=None)
            for c in range(num_classes)]


def score_volumes(run_dir: str, volumes: Sequence[Volume], *, part: str) -> int:
    """Score ``volumes`` of the run at ``run_dir`` and write their rows as part ``part`` of the
    volume table; returns the number of rows written."""
    run = RunReader(run_dir)
    rows = []
    for v in volumes:
        rows.extend(volume_rows(run, v))
        log.info("volume %s: %d slices scored", v.volume_id, len(v.slices))
    table = pa.Table.from_pylist([{k: r.get(k) for k in VOLUME_SCHEMA.names} for r in rows], schema=VOLUME_SCHEMA)
    write_part(table, table_dir(run_dir, "volumes", run.run_id), f"{part}.parquet")
    return table.num_rows


def read_volume_table(run_dir: str) -> pa.Table:
    """The run's volume table (:data:`VOLUME_SCHEMA`, ``run_id`` first); empty when it scored no volume."""
    return read_table(table_dir(run_dir, "volumes"), VOLUME_SCHEMA)


def clear_volume_table(run_dir: str) -> None:
    """Remove the volume table's parts: it is written anew, whole, at the end of every run (a run
    resumed or extended scores all its volumes again, so no stale row survives)."""
    location = table_dir(run_dir, "volumes")
    if fsio.exists(location):
        fs, inner = fsio.url_to_fs(location)
        fs.rm(inner, recursive=True)


__all__ = ["VOLUME_SCHEMA", "Volume", "check_volume_pattern", "clear_volume_table", "find_volumes",
           "read_volume_table", "score_volumes", "stack_volume", "volume_rows"]
