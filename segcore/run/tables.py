"""Parquet tables that segflow writes, and how they are written (atomically, one part per unit).

The Dice dataset is Hive-partitioned by ``run_id``: ``RUN_DIR/dice/run_id=<id>/unit-00042.parquet``
(a tiled large image, whose blocks are units, gets one part of its own: ``g001-000000.parquet``).
Following the Hive convention, the partition column lives in the directory name, not inside the
files; pyarrow.dataset, pandas and DuckDB (``hive_partitioning=true``) add it back as a column.
Table locations are local paths or fsspec URLs (``s3://bucket/run/dice``), see :mod:`segcore.fsio`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from segcore import fsio

DICE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("dice", pa.float64()),
        ("tp", pa.int64()),
        ("fp", pa.int64()),
        ("fn", pa.int64()),
        ("gt_pixels", pa.int64()),
        ("pred_pixels", pa.int64()),
        ("empty_gt", pa.bool_()),
        ("model", pa.string()),
        ("checkpoint_sha256", pa.string()),
        ("unit", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("channels_adapted", pa.string()),
    ]
)

#: Documented columns of the Dice dataset as read back (partition column included).
DICE_COLUMNS = ("run_id",) + tuple(DICE_SCHEMA.names)


#: One row per tiled (large) image of an instance model: how its blocks were stitched.
SEAM_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("blocks", pa.int32()),
    ("tile_size", pa.int32()),
    ("overlap", pa.int32()),
    ("objects", pa.int64()),
    ("objects_on_seams", pa.int64()),
    ("duplicates_dropped", pa.int64()),
    ("cut_risk", pa.int64()),
    ("windows_at_cap", pa.int64()),
    ("model", pa.string()),
    ("checkpoint_sha256", pa.string()),
])


def dice_table(*, image_ids: Sequence[str], class_names: Sequence[str], tp: np.ndarray, fp: np.ndarray,
               fn: np.ndarray, dice: np.ndarray, empty_gt: np.ndarray, model: str, checkpoint_sha256: str,
               unit: str, errors: Sequence[tuple[str, str]] = (),
               channels_adapted: Sequence[str] | None = None) -> pa.Table:
    """Rows ``(image, class)`` for evaluated images plus ``status="error"`` rows.

    ``tp/fp/fn/dice/empty_gt`` are ``(len(image_ids), len(class_names))``; ``errors`` is a list of
    ``(image_id, message)`` for images of the unit that could not be evaluated (one row per class,
    with null Dice and counts). ``channels_adapted``: per evaluated image, how its channels were
    adapted to the model's (:func:`segcore.run.channels.channel_note`; default ``""``, none);
    error rows get ``""``.
    """
    n, c = len(image_ids), len(class_names)
    ids = np.repeat(np.asarray(image_ids, dtype=object), c)
    cls = np.tile(np.arange(c, dtype=np.int32), n)
    cols: dict[str, Any] = {
        "image_id": ids.tolist(),
        "class_id": cls,
        "class_name": [class_names[i] for i in cls],
        "dice": np.asarray(dice, dtype=np.float64).reshape(-1),
        "tp": np.asarray(tp, dtype=np.int64).reshape(-1),
        "fp": np.asarray(fp, dtype=np.int64).reshape(-1),
        "fn": np.asarray(fn, dtype=np.int64).reshape(-1),
        "gt_pixels": (np.asarray(tp) + np.asarray(fn)).astype(np.int64).reshape(-1),
        "pred_pixels": (np.asarray(tp) + np.asarray(fp)).astype(np.int64).reshape(-1),
        "empty_gt": np.asarray(empty_gt, dtype=bool).reshape(-1),
        "model": [model] * (n * c),
        "checkpoint_sha256": [checkpoint_sha256] * (n * c),
        "unit": [unit] * (n * c),
        "status": ["ok"] * (n * c),
        "error": [None] * (n * c),
        "channels_adapted": np.repeat(np.asarray(channels_adapted if channels_adapted is not None else [""] * n,
                                                 dtype=object), c).tolist(),
    }
    ok = pa.table(cols, schema=DICE_SCHEMA)
    if not errors:
        return ok
    err_rows = [
        {"image_id": image_id, "class_id": k, "class_name": class_names[k], "model": model,
         "checkpoint_sha256": checkpoint_sha256, "unit": unit, "status": "error", "error": message,
         "channels_adapted": ""}
        for image_id, message in errors
        for k in range(c)
    ]
    return pa.concat_tables([ok, pa.Table.from_pylist(err_rows, schema=DICE_SCHEMA)])


def write_part(table: pa.Table, directory: str | os.PathLike[str], name: str) -> str:
    """Write ``table`` to ``directory/name`` (a path or URL) atomically; returns its location.

    A reader listing the directory sees either no file or the whole file, never a half-written one
    (locally: a temporary name starting with '.', which Parquet dataset readers skip, then a rename;
    on object stores: one PUT of the whole part).
    """
    dest = fsio.join(directory, name)
    fsio.write_bytes(dest, fsio.to_buffer(lambda f: pq.write_table(table, f)))
    return dest


INSTANCE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("instance_id", pa.int64()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("score", pa.float64()),
        ("bbox", pa.list_(pa.int64(), 4)),
        ("area", pa.int64()),
        ("model", pa.string()),
        ("checkpoint_sha256", pa.string()),
        ("unit", pa.string()),
    ]
)

_METRIC_FIELDS = ("n_pred", "n_gt", "tp", "fp", "fn", "precision", "recall", "f1", "mean_matched_iou",
                  "panoptic_quality", "segmentation_quality", "recognition_quality", "ap", "ap50", "ap75")
INSTANCE_METRICS_SCHEMA = pa.schema(
    [("image_id", pa.string())]
    + [(f, pa.int64() if f in ("n_pred", "n_gt", "tp", "fp", "fn") else pa.float64()) for f in _METRIC_FIELDS]
    + [("model", pa.string()), ("checkpoint_sha256", pa.string()), ("unit", pa.string())]
)


def instance_table(images: Sequence[tuple[str, Sequence[dict[str, Any]]]], *, class_names: Sequence[str],
                   model: str, checkpoint_sha256: str, unit: str) -> pa.Table:
    """One row per predicted instance; ``images`` is ``[(image_id, records), ...]`` with the
    records of :class:`segcore.models.instances.InstancePrediction` (bbox ``(x0, y0, x1, y1)``, exclusive ends)."""
    rows = [
        {"image_id": image_id, "instance_id": r["instance_id"], "class_id": r["class_id"],
         "class_name": class_names[r["class_id"]], "score": float(r["score"]), "bbox": [int(v) for v in r["bbox"]],
         "area": int(r["area"]), "model": model, "checkpoint_sha256": checkpoint_sha256, "unit": unit}
        for image_id, records in images
        for r in records
    ]
    return pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)


def instance_metrics_table(images: Sequence[tuple[str, dict[str, Any]]], *, model: str, checkpoint_sha256: str,
                           unit: str) -> pa.Table:
    """One row per evaluated image from :func:`segcore.metrics.instance.instance_scores` results."""
    rows = [{"image_id": image_id, **{f: scores[f] for f in _METRIC_FIELDS}, "model": model,
             "checkpoint_sha256": checkpoint_sha256, "unit": unit} for image_id, scores in images]
    return pa.Table.from_pylist(rows, schema=INSTANCE_METRICS_SCHEMA)


def read_hive(location: str | os.PathLike[str], schema: pa.Schema, partitions: pa.Schema, *,
              filter: Any = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Hive-partitioned Parquet dataset (a path or URL) whose files hold ``schema`` and whose
    directory names hold ``partitions``; partition columns come first. Empty (with that schema)
    when no part exists yet; hidden parts (names starting with '.' or '_') are skipped. ``columns``
    reads only those (in that order); ``None``: all."""
    full_schema = pa.schema(list(partitions) + list(schema))
    names = list(columns) if columns is not None else full_schema.names
    if not fsio.list_files(location, suffix=".parquet"):
        return full_schema.empty_table().select(names)
    fs, inner = fsio.url_to_fs(location)
    ds = pads.dataset(inner, format="parquet", schema=full_schema, filesystem=None if fsio.is_local(location) else fs,
                      partitioning=pads.partitioning(partitions, flavor="hive"))
    return ds.to_table(columns=names, filter=filter)


def read_table(path: str | os.PathLike[str], schema: pa.Schema, *, filter: Any = None) -> pa.Table:
    """Read a table directory of a run (Hive-partitioned by ``run_id``, included as a string column)."""
    return read_hive(path, schema, pa.schema([("run_id", pa.string())]), filter=filter)


def read_dice(path: str | os.PathLike[str], *, filter: Any = None) -> pa.Table:
    """Read a Dice dataset directory (``RUN_DIR/dice``); see :func:`read_table`."""
    return read_table(path, DICE_SCHEMA, filter=filter)
