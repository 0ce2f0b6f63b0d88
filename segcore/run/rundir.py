"""The run directory: what one segmentation run of one store with one checkpoint produces.

Layout of ``RUN_DIR``::

    run.json                          run_id, key, created, store, checkpoint + sha256, model meta, spec,
                                      the output-shaping parameters, the device the key was computed for
    plan.json                         the run plan: work units, tiled images, tiling (segcore.run.plan)
    masks.zarr/<group>/0              (N, H, W) uint8 predicted class labels, chunks = work units
                                      (tiled groups: (1, tile, tile) blocks); <group> is an OME-Zarr
                                      label image, <group>/1, <group>/2, ... its pyramid levels
    instances.zarr/<group>/0          (N, H, W) uint32 instance ids (instance models only), same chunks
    dice/run_id=<run_id>/<unit>.parquet   Dice rows of one unit (Hive-partitioned dataset)
    instances/run_id=<run_id>/<unit>.parquet         predicted instances (instance models only)
    instance_metrics/run_id=<run_id>/<unit>.parquet  per-image instance metrics (instance ground truth)
    seams/run_id=<run_id>/<group>-<index>.parquet    stitching record of a tiled image (instance models)
    blocks/<unit>.npz                 objects kept by one block of a tiled image (instance models)
    units/<marker>.json               done-records (segcore.run.context), each written last by its step:
                                      <unit>.json (a unit or a block), <unit>.detect.json (a block's
                                      detections), image-<group>-<index>.json (a tiled image's tables)
    failed/<marker>.json              units (or blocks) the last run gave up on: which, why, how many attempts
                                      (segcore.run.rundir.mark_failed); the next run retries them
    summary.json, summary.md          run summary

Executing the same run again into the same directory *resumes*: steps with a done-record of the
run's key are skipped, unfinished ones are redone, and every file they write atomically replaces
its previous version, so there is exactly one Dice part per unit. The key names the store's
identity, the checkpoint's sha256 and the output-shaping parameters
(:func:`segcore.run.plan.output_shaping`); another store, checkpoint or any other such parameter
is refused with a message naming what differs, so one run directory never mixes two settings.

``RUN_DIR`` is a local path or any fsspec URL (``s3://bucket/runs/r1``, ``file://...``); every
location below is then a string in the same form (see :mod:`segcore.fsio`). ``masks.zarr`` and
``instances.zarr`` are OME-Zarr labels groups (:mod:`segcore.ngff`); :func:`label_array` opens the
full-resolution array of a group (also in run directories of an earlier segflow, which kept it at
``masks.zarr/<group>``), :func:`pyramid_jobs` lists the label images whose pyramids
:func:`segcore.pyramid.write_label_pyramid` writes once a run's masks are complete (and
:func:`unlist_pyramids` marks those of groups written again as out of date when a run ends without).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import time
import uuid
from pathlib import Path
from typing import Any, Collection, Sequence

import zarr

from segcore import fsio
from segcore.collection.store import GroupInfo
from segcore.errors import NotFound, StoreError
from segcore.lease import is_lease_name
from segcore.models.checkpoint import ModelMeta
from segcore.ngff import IMAGE_AXES, LEVEL0, SPACE_UNITS, create_label_image, labels_group_attrs
from segcore.pyramid import list_levels, plan_levels
from segcore.run.context import Record, record_from_json, run_key
from segcore.run.legacy import legacy_plan, setting_differences, upgrade
from segcore.run.plan import RunPlan

#: Format 2 records the run key, the output-shaping parameters and the plan; a format-1 directory
#: is upgraded when it is resumed with its settings (:mod:`segcore.run.legacy`).
RUN_FORMAT = 2

log = logging.getLogger(__name__)


def masks_path(run_dir: str | os.PathLike[str]) -> str:
    return fsio.join(run_dir, "masks.zarr")


def instances_path(run_dir: str | os.PathLike[str]) -> str:
    return fsio.join(run_dir, "instances.zarr")


def table_dir(run_dir: str | os.PathLike[str], table: str, run_id: str | None = None) -> str:
    """Location of a Hive-partitioned table (``dice``, ``instances``, ``instance_metrics``, ``seams``)."""
    return fsio.join(run_dir, table, *([] if run_id is None else [f"run_id={run_id}"]))


def dice_dir(run_dir: str | os.PathLike[str], run_id: str | None = None) -> str:
    return table_dir(run_dir, "dice", run_id)


def absolute_location(location: str | os.PathLike[str]) -> str:
    """An absolute, resolved path for a local location (``file://`` URLs included); a URL otherwise."""
    if fsio.is_local(location):
        return str(Path(fsio.url_to_fs(location)[1]).resolve())
    return os.fspath(location)


def read_run_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``run.json`` of a run directory."""
    path = fsio.join(run_dir, "run.json")
    if not fsio.exists(path):
        raise NotFound(f"{str(run_dir)!r} is not a segflow run directory (no run.json); run 'segflow segment' first")
    return fsio.read_json(path)


def _foreign_entries(run_dir: str, store_abs: str) -> list[str]:
    """Entries of ``run_dir`` other than the store (``segflow run`` may keep its store inside) and leases."""
    fs, root = fsio.url_to_fs(run_dir)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    entries = fs.ls(root, detail=False)
    if fsio.is_local(run_dir):
        entries = [e for e in entries if str(Path(e).resolve()) != store_abs]
    elif not fsio.is_local(store_abs):  # a store inside a run directory on the same object store
        inside = fsio.url_to_fs(store_abs)[1].rstrip("/")
        entries = [e for e in entries if e.rstrip("/") != inside]
    return [e for e in entries if e.rstrip("/") != root.rstrip("/") and not is_lease_name(e.rstrip("/"))]


def _image_source(run_dir: str, store_abs: str) -> str | None:
    """Relative path from ``masks.zarr`` to the store's ``images`` group, when both are local."""
    if not (fsio.is_local(run_dir) and fsio.is_local(store_abs)):
        return None
    return os.path.relpath(os.path.join(store_abs, "images"), absolute_location(masks_path(run_dir)))


def label_array(location: str, group: str, *, mode: str = "r") -> zarr.Array:
    """The full-resolution label array of store group ``group`` in ``masks.zarr`` or ``instances.zarr``
    (``location``): ``<location>/<group>/0``, or ``<location>/<group>`` in a run directory of an earlier
    segflow. ``mode`` ``"r+"`` to write."""
    node = zarr.open_group(location, mode=mode)[group]
    return node if isinstance(node, zarr.Array) else node[LEVEL0]


def label_arrays(location: str) -> dict[str, zarr.Array]:
    """Every full-resolution label array of ``masks.zarr`` or ``instances.zarr`` (``location``), by group."""
    root = zarr.open_group(location, mode="r")
    found = dict(root.arrays())  # an earlier segflow's layout
    found.update({name: image[LEVEL0] for name, image in root.groups()})
    return dict(sorted(found.items()))


def pyramid_jobs(run_dir: str, *, changed: Collection[str] = ()) -> list[tuple[str, bool]]:
    """``(location, overwrite)`` of each label image of the run (``masks.zarr/<group>``,
    ``instances.zarr/<group>``) whose pyramid is to be written: its labels need more than one level
    (:func:`segcore.pyramid.plan_levels`) and it lacks them, or its group is in ``changed`` (its labels
    were written again: ``overwrite``)."""
    jobs = []
    for location in (masks_path(run_dir), instances_path(run_dir)):
        if not fsio.exists(fsio.join(location, "zarr.json")):
            continue
        for name, image in sorted(zarr.open_group(location, mode="r").groups()):
            level0 = image[LEVEL0]
            planned = [lv.path for lv in plan_levels(level0.shape, level0.metadata.dimension_names)]
            listed = [d["path"] for d in image.attrs["ome"]["multiscales"][0]["datasets"]]
            if len(planned) > 1 and (name in changed or listed != planned):
                jobs.append((fsio.join(location, name), name in changed))
    return jobs


def unlist_pyramids(run_dir: str, groups: Collection[str]) -> None:
    """List only the full resolution of the label images of ``groups`` (their labels were written again
    and their pyramids are out of date), so that :func:`pyramid_jobs` writes them again."""
    for location in (masks_path(run_dir), instances_path(run_dir)):
        if not fsio.exists(fsio.join(location, "zarr.json")):
            continue
        root = zarr.open_group(location, mode="r+")
        for name in sorted(set(groups) & set(root.group_keys())):
            image = root[name]
            if len(image.attrs["ome"]["multiscales"][0]["datasets"]) > 1:
                list_levels(image, [(1,) * image[LEVEL0].ndim])


def _add_arrays(root: zarr.Group, groups: Sequence[GroupInfo], *, dtype: str, class_names: list[str] | None,
                source: str | None) -> list[str]:
    """Create the label images (``(N, H, W)`` level 0) of ``groups`` that ``root`` lacks; returns their names."""
    added = []
    for g in groups:
        if g.name in root:
            continue
        image = None if source is None else posixpath.join("..", source, g.name)  # from masks.zarr/<group>
        known = g.volume is not None and g.spacing is not None and g.unit in SPACE_UNITS  # a volume's voxel size
        create_label_image(root, g.name, shape=(g.count, g.height, g.width), chunks=g.chunk_shape, dtype=dtype,
                           class_names=class_names, source=image,
                           dimension_names=("z", "y", "x") if g.volume is not None else IMAGE_AXES,
                           spacing=tuple(g.spacing) if known else None, unit=g.unit if known else None)
        added.append(g.name)
    return added


def _label_arrays(run_dir: str, groups: Sequence[GroupInfo], *, meta: ModelMeta, segflow_attrs: dict[str, Any],
                  source: str | None, create: bool) -> None:
    """Create (``create``) or complete the mask (and instance) label images of ``groups``, and list them."""
    targets = [(masks_path(run_dir), "uint8" if meta.num_classes <= 256 else "uint16", list(meta.class_names))]
    if meta.kind == "instance":
        targets.append((instances_path(run_dir), "uint32", None))
    for location, dtype, class_names in targets:
        root = zarr.open_group(location, mode="w" if create else "r+")
        if create:
            root.attrs["segflow"] = segflow_attrs
        if _add_arrays(root, groups, dtype=dtype, class_names=class_names, source=source) or create:
            if any(True for _ in root.array_keys()):  # an earlier segflow's layout: its metadata stays
                log.warning("%s holds label arrays of an earlier segflow (no pyramids); only its new groups are "
                            "OME-Zarr label images", location)
            else:
                root.attrs["ome"] = labels_group_attrs(list(root.group_keys()))


#: The shaping parameters (:func:`segcore.run.plan.output_shaping`) by the options that set them, for
#: messages; a key recorded only when on (``tta_whole_images``, ``compiled``), or None, reads "off".
_SHAPING_NAMES = {"tta_whole_images": "--tta (whole images)", "compiled": "--compile", "tile_size": "--tile-size",
                  "overlap": "--overlap", "blend": "--blend", "tta": "--tta (tiles)",
                  "precision": "precision (--precision; fp32 on the CPU)"}
_ON_ONLY = ("tta_whole_images", "compiled")
#: Parameters a run derives when their option is not given, and how.
_DERIVED = {"tile_size": " (not given: the model's default)", "overlap": " (not given: derived from the tile size)"}


def _shaping_differences(recorded: dict[str, Any], asked: dict[str, Any], spec: dict[str, Any] | None = None
                         ) -> list[str]:
    """Each output-shaping parameter in which ``asked`` differs from ``recorded``, named by its option
    (a tile size or overlap the options of ``spec``, the run asked now, left to derive: said so)."""
    def value(d: dict[str, Any], k: str) -> Any:
        if k in _ON_ONLY or d.get(k) is None:  # None: no tiling, so no tile size, overlap, blend or tile TTA
            return "on" if d.get(k) else "off"
        return repr(d.get(k))

    def name(k: str) -> str:
        derived = spec is not None and k in _DERIVED and spec.get(k) is None and asked.get(k) is not None
        return f"{_SHAPING_NAMES.get(k, k)}{_DERIVED[k] if derived else ''}"

    return [f"{name(k)}: {value(recorded, k)} in the run directory, {value(asked, k)} now"
            for k in sorted(set(recorded) | set(asked)) if recorded.get(k) != asked.get(k)]


def resumable_shaping(info: dict[str, Any], shaping: dict[str, Any], *, device: str, asked_device: str | None
                      ) -> dict[str, Any]:
    """``shaping`` as the run directory of ``info`` compares it. A run on the CPU computes in fp32
    whatever precision was asked, and records fp32; a run directory written with ``--device auto``
    on a machine without CUDA before that was recorded kept the precision asked (``bf16``), so a
    run there now (``device`` ``cpu``, resolved from ``asked_device`` ``auto``) takes the recorded
    precision and resumes: the computation is the same. Run directories that record the device
    their key was computed for (``key_device``) are compared as they are."""
    recorded = (info.get("shaping") or {}).get("precision")
    if ("key_device" not in info and shaping.get("precision") == "fp32" and recorded not in (None, "fp32")
            and device == "cpu" and asked_device == "auto" and (info.get("spec") or {}).get("device", "auto") == "auto"):
        return {**shaping, "precision": recorded}
    return shaping


def _reopen(run_dir: str, info: dict[str, Any], *, store_abs: str, store_id: str | None, checkpoint_sha256: str,
            shaping: dict[str, Any], plan: RunPlan, spec: dict[str, Any]) -> None:
    """Refuse to resume a run of anything else than what is asked now (see the module docstring)."""
    if info.get("store") != store_abs or info.get("checkpoint_sha256") != checkpoint_sha256:
        raise StoreError(
            f"{run_dir!r} holds run {info.get('run_id')} of store {info.get('store')} with checkpoint "
            f"sha256 {str(info.get('checkpoint_sha256'))[:12]}; use a new --out directory for this store/checkpoint"
        )
    if store_id and info.get("store_id") and info["store_id"] != store_id:
        raise StoreError(
            f"{run_dir!r} holds run {info.get('run_id')} of an earlier version of store {store_abs} (it was "
            "created anew since, e.g. with --overwrite); its masks and Dice rows would be stale. Use a new --out "
            "directory")
    if "shaping" not in info:  # format 1: compared by the spec fields it recorded (segcore.run.legacy)
        differ = setting_differences(info, spec)
    else:
        differ = _shaping_differences(info["shaping"], shaping, spec)
    if differ:
        raise StoreError(
            f"{run_dir!r} holds run {info.get('run_id')} made with other settings ({'; '.join(differ)}); its "
            "outputs would mix two settings. Use a new --out directory, or run again with the recorded settings")
    recorded = read_plan(run_dir)
    if not plan.extends(recorded):
        raise StoreError(f"{run_dir!r}: the work units of store {store_abs} no longer match the run's plan "
                         f"({len(recorded.units)} recorded units); use a new --out directory")


def prepare_run(run_dir: str, *, store_path: str, checkpoint: str, checkpoint_sha256: str, meta: ModelMeta,
                groups: Sequence[GroupInfo], plan: RunPlan, shaping: dict[str, Any], spec: dict[str, Any],
                store_id: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Create (or reopen for resuming) a run directory, its mask arrays and its plan; returns the run info.

    ``run_dir`` is a local path or an fsspec URL. ``plan`` is recorded in ``plan.json`` (a store that
    gained groups since extends it); ``shaping`` (:func:`segcore.run.plan.output_shaping`) goes into
    ``run.json`` with the run ``key`` (:func:`segcore.run.context.run_key`). Reopening creates the
    arrays of store groups that the run directory lacks, leaving the others as they are; ``device``:
    the one the key was computed for (:func:`resumable_shaping`).

    Raises:
        StoreError: ``run_dir`` holds a run of another store or checkpoint, of an earlier version
            of the store (``store_id`` differs), with other output-shaping parameters (the message
            names each), whose plan the store no longer extends, or is not empty and holds no run.
    """
    info_path = fsio.join(run_dir, "run.json")
    store_abs = absolute_location(store_path)
    source = _image_source(run_dir, store_abs)
    if fsio.exists(info_path):
        info = fsio.read_json(info_path)
        shaping = resumable_shaping(info, shaping, device=device, asked_device=spec.get("device"))
        _reopen(run_dir, info, store_abs=store_abs, store_id=store_id, checkpoint_sha256=checkpoint_sha256,
                shaping=shaping, plan=plan, spec=spec)
        if "shaping" not in info:  # a run directory of an earlier segflow, resumed with its settings
            info = upgrade(run_dir, info, shaping=shaping, plan=plan, format_version=RUN_FORMAT,
                           key=run_key(store_id=store_id, checkpoint_sha256=checkpoint_sha256, shaping=shaping))
        _label_arrays(run_dir, groups, meta=meta, segflow_attrs={}, source=source, create=False)
        fsio.write_json(fsio.join(run_dir, "plan.json"), plan.to_json())
        return info
    if _foreign_entries(run_dir, store_abs):
        raise StoreError(f"{run_dir!r} exists and is not a segflow run directory; choose an empty or new --out")
    now = dt.datetime.now(dt.timezone.utc)
    info = {
        "format": RUN_FORMAT,
        "run_id": f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
        "key": run_key(store_id=store_id, checkpoint_sha256=checkpoint_sha256, shaping=shaping),
        "created": now.isoformat(),
        "store": store_abs,
        "store_id": store_id,
        "checkpoint": absolute_location(checkpoint),
        "checkpoint_sha256": checkpoint_sha256,
        "model": json.loads(meta.model_dump_json()),
        "shaping": shaping,
        "key_device": device,
        "spec": spec,
    }
    attrs = {"run_id": info["run_id"], "class_names": list(meta.class_names),
             "checkpoint_sha256": checkpoint_sha256, "spec": spec}
    _label_arrays(run_dir, groups, meta=meta, segflow_attrs=attrs, source=source, create=True)
    fsio.write_json(fsio.join(run_dir, "plan.json"), plan.to_json())
    fsio.write_json(info_path, info)  # written last: its presence means the directory is complete
    return info


def read_plan(run_dir: str | os.PathLike[str]) -> RunPlan:
    """The plan recorded in ``RUN_DIR/plan.json`` by :func:`prepare_run` (for a run directory of an
    earlier segflow, which recorded none, the plan it was made with: :func:`segcore.run.legacy.legacy_plan`)."""
    path = fsio.join(run_dir, "plan.json")
    if not fsio.exists(path):
        info = read_run_info(run_dir)
        if info.get("format", 1) < RUN_FORMAT:
            return legacy_plan(info)
        raise NotFound(f"{str(run_dir)!r} records no run plan (no plan.json); run 'segflow segment' into it again")
    return RunPlan.from_json(fsio.read_json(path))


def mask_chunks(run_dir: str) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(chunk shape, array shape)`` of every full-resolution mask array, by group name (both ``(images, h, w)``)."""
    chunks, counts = {}, {}
    for name, arr in label_arrays(masks_path(run_dir)).items():
        chunks[name] = tuple(arr.chunks)
        counts[name] = tuple(arr.shape)
    return chunks, counts


def mark_done(run_dir: str, record: Record) -> None:
    """Write ``record`` as the done-record of its step (``units/<record.marker>.json``). Every step
    writes it last, after all its outputs: its presence means the step is complete."""
    fsio.write_json(fsio.join(run_dir, "units", f"{record.marker}.json"), record.to_json())


def done_records(run_dir: str, key: str) -> dict[str, Record]:
    """The done-records of run ``key`` in ``run_dir``, by marker name (``unit-00042``,
    ``unit-00042.detect``, ``image-g001-000003``); records of another key do not count."""
    found = fsio.list_files(fsio.join(run_dir, "units"), suffix=".json", recursive=False)
    out = {}
    for loc, data in zip(found, fsio.read_many(found)):
        parsed = json.loads(data)
        if isinstance(parsed, dict) and parsed.get("key") == key and "type" in parsed:
            out[loc.rsplit("/", 1)[-1][:-len(".json")]] = record_from_json(parsed)
    return out


def write_summary(run_dir: str, summary: dict[str, Any], markdown: str) -> None:
    fsio.write_json(fsio.join(run_dir, "summary.json"), summary)
    fsio.write_bytes(fsio.join(run_dir, "summary.md"), markdown.encode())


def _failed_location(run_dir: str, marker: str) -> str:
    return fsio.join(run_dir, "failed", f"{marker}.json")


def mark_failed(run_dir: str, *, key: str, unit: str, reason: str, attempts: int) -> None:
    """Record that run ``key`` gave up on step ``unit`` (a unit or block marker) after ``attempts`` attempts,
    for ``reason`` (``RUN_DIR/failed/<unit>.json``). The step has no done-record, so the next run retries it."""
    fsio.write_json(_failed_location(run_dir, unit), {"unit": unit, "key": key, "reason": reason,
                                                       "attempts": attempts, "time": time.time()})


def failed_records(run_dir: str, key: str) -> dict[str, dict[str, Any]]:
    """The failed-records of run ``key`` by unit (``unit``, ``reason``, ``attempts``, ``time``: Unix seconds)."""
    found = fsio.list_files(fsio.join(run_dir, "failed"), suffix=".json", recursive=False)
    records = (json.loads(data) for data in fsio.read_many(found))
    return {r["unit"]: r for r in records if isinstance(r, dict) and r.get("key") == key}


def clear_failed(run_dir: str, units: Sequence[str]) -> None:
    """Remove the failed-records of ``units`` (steps that are now done)."""
    for unit in units:
        location = _failed_location(run_dir, unit)
        fs, path = fsio.url_to_fs(location)
        if fs.exists(path):
            fs.rm(path)
