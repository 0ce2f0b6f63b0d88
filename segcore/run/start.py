"""Start (or resume) a run: fail fast on a broken setup, record the run, build its context.

:func:`start_run` is what the segment flow does before any work fans out, and what a user does
to run units by hand::

    ctx, plan, meta, store = start_run("collection.zarr", "unet.safetensors", "runs/r1")
    for unit in plan.units:
        segment_unit(ctx, unit)          # whole-image units (segcore.run.units)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import torch

from segcore.collection.store import StoreInfo, open_store
from segcore.errors import CheckpointError, ConfigError, NotFound
from segcore.models.checkpoint import ModelMeta
from segcore.models.predict import compiles, open_predictor
from segcore.models.record import local_record, model_sha256, read_model_meta
from segcore.run.channels import can_adapt, channel_note
from segcore.run.context import RunContext
from segcore.run.plan import RunPlan, effective_precision, make_plan, output_shaping, resolve_tiling
from segcore.run.rundir import done_records, prepare_run, read_plan, read_run_info, resumable_shaping
from segcore.run.schedule import pending_steps

log = logging.getLogger(__name__)


def preflight(store_path: str, checkpoint: str) -> tuple[ModelMeta, str, StoreInfo]:
    """Fail fast, before fan-out: the model record (any runtime) readable and its model loading (weights
    fitting the architecture, TorchScript/ONNX graph readable), its declared input axes those of
    segflow (``bcyx``; ``bczyx`` for a volumetric model, whose store must hold no blocked groups), its
    normalisation applicable (:func:`check_normalisation`) and its output rule one segflow applies, and
    at least one store group whose channels the channel policy can feed to the model
    (:mod:`segcore.run.channels`; the images of the other groups become error rows), and ground truth
    the model can score (:func:`check_ground_truth`, :func:`check_mask_labels`). Returns the
    model's metadata, the record's sha256 (:func:`model_sha256`) and the store."""
    meta = check_model(checkpoint)
    with local_record(checkpoint) as local:  # a model at a URL is fetched once for both
        try:
            open_predictor(local, device="cpu", precision="fp32")  # raises CheckpointError if it does not load
            sha = model_sha256(local)  # the content's hash: the same for the copy
        except (CheckpointError, OSError) as exc:  # named as the user named it, not as the copy
            exc.args = tuple(a.replace(local, str(checkpoint)) if isinstance(a, str) else a for a in exc.args)
            raise
    store = open_store(store_path)
    if meta.input_axes not in ("bcyx", "bczyx"):
        raise CheckpointError(f"the model takes input axes {meta.input_axes!r}; segflow feeds 2-D images as bcyx "
                              "(batch, channel, y, x) and volumes to volumetric models as bczyx: re-export the "
                              "model for one of those layouts")
    blocked = [g.name for g in store.groups if g.tile and g.count]
    if meta.input_axes == "bczyx" and (meta.kind != "semantic" or blocked):
        raise CheckpointError(
            f"the volumetric model {meta.arch!r} cannot segment this store: "
            + ("only semantic volumetric models are supported" if meta.kind != "semantic" else
               f"groups {', '.join(blocked)} store their images or slices in square blocks (larger than "
               "--tile-chunk); ingest again with --tile-chunk 0"))
    check_channels(store, model_channels=meta.in_channels)
    if store.has_gt:
        check_ground_truth(meta, store.mask_kind)
        if store.mask_kind == "class":
            note = check_mask_labels(meta, store.fingerprint)
            if note:
                log.warning("%s", note)
    return meta, sha, store


def check_ground_truth(meta: ModelMeta, mask_kind: str) -> None:
    """Raise :class:`~segcore.errors.CheckpointError` when the model cannot be scored against ground
    truth of ``mask_kind``: instance labels are scored as foreground vs background, which takes a
    model of two classes (background and one other; an instance model or a 2-class UNet)."""
    if mask_kind == "instance" and meta.num_classes != 2:
        raise CheckpointError(
            f"instance-label ground truth is scored as foreground vs background, but the model has "
            f"{meta.num_classes} classes ({', '.join(meta.class_names)}); use a model of two classes (background "
            "and one other), or, if the masks are class maps (0 background, 1..K the classes), ingest them with "
            "--mask-kind class")


def check_mask_labels(meta: ModelMeta, fingerprint: Mapping[str, Any] | None) -> str | None:
    """Compare the largest labels of a store's class-map ground truth, as its ingest counted them
    (the fingerprint's ``mask_maxima``, :mod:`segcore.collection.fingerprint`), with the model's
    classes. Raise :class:`~segcore.errors.CheckpointError` when no labelled image could be scored
    (every one holds a label the model lacks: the wrong model or ``--mask-kind`` for these masks);
    return a one-line warning when some could not (those become error rows), else None. Stores
    ingested before the labels were counted are not checked."""
    maxima = {int(k): int(v) for k, v in ((fingerprint or {}).get("mask_maxima") or {}).items()}
    c = meta.num_classes
    bad = sum(n for label, n in maxima.items() if label >= c)
    if not bad:
        return None
    labelled, top = sum(maxima.values()), max(maxima)
    classes = f"{c} classes ({', '.join(meta.class_names)})"
    if bad == labelled:
        raise CheckpointError(
            f"the ground truth of every labelled image holds a label the model lacks (labels up to {top}; the "
            f"model has {classes}), so no image could be scored: use a checkpoint trained for these classes, or "
            "ingest the masks with --mask-kind instance if they label objects rather than classes")
    return (f"{bad} of {labelled} labelled image(s) hold labels the model lacks (up to {top}; the model has "
            f"{classes}); their Dice rows will be error rows")


def check_model(checkpoint: str) -> ModelMeta:
    """The :class:`ModelMeta` of the model record ``checkpoint`` (its metadata only: no weights are
    loaded), checked as far as it can be without a store: readable, its normalisation applicable
    (:func:`check_normalisation`) and its output rule one segflow applies. Raises
    :class:`~segcore.errors.NotFound` or :class:`~segcore.errors.CheckpointError`."""
    meta = read_model_meta(checkpoint)
    check_normalisation(meta)
    if meta.output.largest_region and (meta.spatial_dims != 2 or meta.kind != "semantic"):
        raise CheckpointError("the model's output rule keeps the largest foreground region of each image, which "
                              "segflow applies to 2-D semantic models only; this one is "
                              + ("volumetric" if meta.spatial_dims != 2 else "an instance model"))
    return meta


def check_normalisation(meta: ModelMeta) -> None:
    """Raise :class:`~segcore.errors.CheckpointError` when the model's stored normalisation could not
    be applied to any image: a ``zscore`` or ``ct`` scheme without its fitted values (a
    record made through the Python API without fitting), or per-channel values for another number of
    channels than the model takes."""
    norm = meta.normalisation
    if not norm.fitted:
        raise CheckpointError(
            f"the model's {norm.mode!r} normalisation has no fitted values (mean/std"
            + (", clip bounds" if norm.mode == "ct" else "") + "); every image would fail. Fit it on the "
            "training images (segcore.normalise_fit.fit_normalisation, as 'segflow train' does) and save "
            "the model again")
    # Normalisation itself refuses std/clip_high of another length than mean/clip_low
    for name, values in (("mean", norm.mean), ("clip_low", norm.clip_low)):
        if values is not None and len(values) != meta.in_channels:
            raise CheckpointError(f"the model's normalisation has {len(values)} {name} value(s), one per input "
                                  f"channel is needed, and the model takes {meta.in_channels} channel(s); the record "
                                  "is inconsistent")


def check_channels(store: StoreInfo, *, model_channels: int) -> None:
    """Raise :class:`~segcore.errors.CheckpointError` (one line, naming the channel counts found and
    the model's) when no image of ``store`` can be fed to a ``model_channels`` model; log the groups
    that are adapted or refused otherwise."""
    groups = [g for g in store.groups if g.count]
    found = sorted({g.channels for g in groups})
    usable = [g for g in groups if can_adapt(g.channels, model_channels=model_channels)]
    if groups and not usable:
        raise CheckpointError(
            f"no image of the store can be fed to the model: the images have {', '.join(map(str, found))} "
            f"channel(s) and the model takes {model_channels}; segflow adapts only grey <-> RGB and RGBA with a "
            "constant alpha: use a checkpoint trained on such images")
    for g in groups:
        if g not in usable:
            log.warning("store group %s: %d image(s) of %d channel(s) cannot be fed to the %d-channel model; "
                        "they become error rows", g.name, g.count, g.channels, model_channels)
        elif g.channels != model_channels:
            log.info("store group %s: %d image(s) of %d channel(s) adapted to the model (%s)", g.name, g.count,
                     g.channels, channel_note(g.channels, model_channels=model_channels))


def start_run(store_path: str, checkpoint: str, out: str, *, tile_size: int | None = None, overlap: int | None = None,
              blend: str = "gaussian", tta: bool = False, precision: str = "bf16", batch_size: int = 8,
              device: str = "auto", num_threads: int | None = None, compile: bool = False,
              spec: dict[str, Any] | None = None, workers_here: bool = False
              ) -> tuple[RunContext, RunPlan, ModelMeta, StoreInfo]:
    """Preflight, then create or reopen the run directory ``out`` with its plan and output-shaping
    parameters (:func:`segcore.run.rundir.prepare_run`), and build the run's context.

    ``tile_size`` 0 segments large images whole; ``compile``: through ``torch.compile`` (semantic
    torch models; a different kernel path, so part of the run's key); ``spec`` is the resolved run
    spec saved with the outputs; ``workers_here``: the workers run on this machine, so ``device``
    ``auto`` is this machine's (:func:`key_device`). Raises :class:`~segcore.errors.CheckpointError`
    or :class:`~segcore.errors.StoreError` (another run, another setting) before anything is written
    to the images' outputs.
    """
    meta, sha, store = preflight(store_path, checkpoint)
    if tta and meta.kind == "instance":
        raise ConfigError("test-time augmentation (--tta) applies to semantic models only")
    tiling = resolve_tiling(meta, tile_size=tile_size, overlap=overlap, blend=blend, tta=tta)
    plan = make_plan(store, tiling)
    if meta.output.largest_region and plan.tiled_images:
        log.warning("%d large image(s) are segmented in blocks, without the model's rule of keeping each image's "
                    "largest foreground region (it applies to whole images); --tile-size 0 segments them whole",
                    len(plan.tiled_images))
    groups = store.groups if tiling else [dataclasses.replace(g, tile=0) for g in store.groups]
    compiled = compile and compiles(meta)
    keyed = key_device(device, workers_here=workers_here)
    shaping = output_shaping(meta, tiling, precision=effective_precision(meta, precision, device=keyed), tta=tta,
                             compiled=compiled)
    info = prepare_run(out, store_path=store_path, store_id=store.store_id, checkpoint=checkpoint,
                       checkpoint_sha256=sha, meta=meta, groups=groups, plan=plan, shaping=shaping,
                       spec={**(spec or {}), "tile_size": tile_size, "overlap": overlap, "blend": blend, "tta": tta,
                             "precision": precision, "compile": compile, "device": device}, device=keyed)
    ctx = RunContext(store=store_path, run_dir=out, run_id=info["run_id"], key=info["key"], checkpoint=checkpoint,
                     checkpoint_sha256=sha, mask_kind=store.mask_kind, tta=tta, batch_size=batch_size, device=device,
                     precision=precision, num_threads=num_threads, tiling=tiling, compile=compiled)
    return ctx, plan, meta, store


def key_device(device: str, *, workers_here: bool) -> str:
    """The device a run's key is computed for: ``cpu`` for ``auto`` when the workers run on this
    machine and it has no CUDA device (the run computes in fp32 there, and records so); else
    ``device`` as asked (remote workers resolve ``auto`` themselves)."""
    if device == "auto" and workers_here and not torch.cuda.is_available():
        return "cpu"
    return device


def pending_work(store_path: str, checkpoint: str, out: str, *, tile_size: int | None = None,
                 overlap: int | None = None, blend: str = "gaussian", tta: bool = False, precision: str = "bf16",
                 device: str = "auto", compile: bool = False, workers_here: bool = False) -> int | None:
    """How many steps of the run in ``out`` remain with these settings (units, blocks and tiled
    images without a done-record), reading only metadata: no model is loaded.

    None when only a segment run can tell: there is no run in ``out`` yet, it was written by an
    earlier segflow, the store has groups its plan does not cover, or the settings differ from the
    recorded ones (the segment run then refuses them, naming what differs).
    """
    try:
        info, plan = read_run_info(out), read_plan(out)
    except NotFound:
        return None
    meta = read_model_meta(checkpoint)
    tiling = resolve_tiling(meta, tile_size=tile_size, overlap=overlap, blend=blend, tta=tta)
    keyed = key_device(device, workers_here=workers_here)
    shaping = output_shaping(meta, tiling, precision=effective_precision(meta, precision, device=keyed), tta=tta,
                             compiled=compile and compiles(meta))
    shaping = resumable_shaping(info, shaping, device=keyed, asked_device=device)
    if info.get("shaping") != shaping or plan.groups != tuple(g.name for g in open_store(store_path).groups):
        return None
    return pending_steps(plan, done_records(out, info["key"]))
