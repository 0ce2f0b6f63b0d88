"""The run directory: what one segmentation run of one store with one checkpoint produces.

Layout of ``RUN_DIR``::

    run.json                          run_id, created, store, checkpoint + sha256, model meta, spec
    masks.zarr/<group>                (N, H, W) uint8 predicted class labels, chunks = work units
                                      (tiled groups: (1, tile, tile) blocks)
    instances.zarr/<group>            (N, H, W) uint32 instance ids (instance models only), same chunks
    dice/run_id=<run_id>/<unit>.parquet   Dice rows of one unit (Hive-partitioned dataset)
    instances/run_id=<run_id>/<unit>.parquet         predicted instances (instance models only)
    instance_metrics/run_id=<run_id>/<unit>.parquet  per-image instance metrics (instance ground truth)
    seams/run_id=<run_id>/<group>-<index>.parquet    stitching record of a tiled image (instance models)
    blocks/<unit>.npz                 objects kept by one block of a tiled image (instance models)
    units/<unit>.json                 done marker of a unit (its record), written last
    summary.json, summary.md          run summary

Executing the same run again into the same directory *resumes*: units with a done marker are
skipped, unfinished ones are redone, and every file they write atomically replaces its previous
version, so there is exactly one Dice part per unit. A different checkpoint or store is refused.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import zarr

from segcore.checkpoint import ModelMeta
from segcore.errors import NotFound, StoreError
from segcore.fileio import atomic_path
from segcore.store import GroupInfo

RUN_FORMAT = 1


def masks_path(run_dir: str | os.PathLike[str]) -> str:
    return str(Path(run_dir) / "masks.zarr")


def instances_path(run_dir: str | os.PathLike[str]) -> str:
    return str(Path(run_dir) / "instances.zarr")


def table_dir(run_dir: str | os.PathLike[str], table: str, run_id: str | None = None) -> Path:
    """Directory of a Hive-partitioned table (``dice``, ``instances``, ``instance_metrics``)."""
    base = Path(run_dir) / table
    return base if run_id is None else base / f"run_id={run_id}"


def dice_dir(run_dir: str | os.PathLike[str], run_id: str | None = None) -> Path:
    return table_dir(run_dir, "dice", run_id)


def _atomic_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def read_run_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``run.json`` of a run directory."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise NotFound(f"{str(run_dir)!r} is not a segflow run directory (no run.json); run 'segflow segment' first")
    return json.loads(path.read_text())


def prepare_run(run_dir: str, *, store_path: str, checkpoint: str, checkpoint_sha256: str, meta: ModelMeta,
                groups: Sequence[GroupInfo], spec: dict[str, Any]) -> dict[str, Any]:
    """Create (or reopen for resuming) a run directory and its mask arrays; returns run info.

    Raises :class:`StoreError` when ``run_dir`` holds a run of another store or checkpoint.
    """
    root = Path(run_dir)
    info_path = root / "run.json"
    store_abs = str(Path(store_path).resolve())
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("store") != store_abs or info.get("checkpoint_sha256") != checkpoint_sha256:
            raise StoreError(
                f"{run_dir!r} holds run {info.get('run_id')} of store {info.get('store')} with checkpoint "
                f"sha256 {str(info.get('checkpoint_sha256'))[:12]}; use a new --out directory for this store/checkpoint"
            )
        return info
    if root.exists() and any(p.resolve() != Path(store_abs) for p in root.iterdir()):
        raise StoreError(f"{run_dir!r} exists and is not a segflow run directory; choose an empty or new --out")
    now = dt.datetime.now(dt.timezone.utc)
    info = {
        "format": RUN_FORMAT,
        "run_id": f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
        "created": now.isoformat(),
        "store": store_abs,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": checkpoint_sha256,
        "model": json.loads(meta.model_dump_json()),
        "spec": spec,
    }
    masks = zarr.open_group(masks_path(root), mode="w")
    masks.attrs["segflow"] = {"run_id": info["run_id"], "class_names": list(meta.class_names),
                              "checkpoint_sha256": checkpoint_sha256, "spec": spec}
    dtype = "uint8" if meta.num_classes <= 256 else "uint16"
    for g in groups:
        masks.create_array(g.name, shape=(g.count, g.height, g.width), chunks=g.chunk_shape,
                           dtype=dtype, fill_value=0, dimension_names=("image", "y", "x"))
    if meta.kind == "instance":
        instances = zarr.open_group(instances_path(root), mode="w")
        instances.attrs["segflow"] = dict(masks.attrs["segflow"])
        for g in groups:
            instances.create_array(g.name, shape=(g.count, g.height, g.width), chunks=g.chunk_shape,
                                   dtype="uint32", fill_value=0, dimension_names=("image", "y", "x"))
    _atomic_json(info_path, info)  # written last: its presence means the directory is complete
    return info


def mask_chunks(run_dir: str) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(chunk shape, array shape)`` of every mask array, by group name (both ``(images, h, w)``)."""
    root = zarr.open_group(masks_path(run_dir), mode="r")
    chunks, counts = {}, {}
    for name, arr in root.arrays():
        chunks[name] = tuple(arr.chunks)
        counts[name] = tuple(arr.shape)
    return chunks, counts


def mark_unit_done(run_dir: str, record: dict[str, Any]) -> None:
    _atomic_json(Path(run_dir) / "units" / f"{record['unit']}.json", record)


def finished_units(run_dir: str) -> dict[str, dict[str, Any]]:
    """Records of the units already done, by unit name."""
    d = Path(run_dir) / "units"
    if not d.exists():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("unit-*.json"))}


def write_summary(run_dir: str, summary: dict[str, Any], markdown: str) -> None:
    _atomic_json(Path(run_dir) / "summary.json", summary)
    with atomic_path(Path(run_dir) / "summary.md") as tmp:
        tmp.write_text(markdown)
