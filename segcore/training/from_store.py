"""Train a registered model on every labelled image of a collection store and save its checkpoint.

:func:`train_from_store` is what ``segflow train`` runs on a worker: it fills the options left as
``None`` from the model kind's defaults (:func:`segcore.config.train_defaults`), reads the
store's labelled images, calls :func:`~segcore.training.semantic.train_semantic` or
:func:`~segcore.training.instance.train_instance`, adds the command and the store to the
provenance and writes the best epoch's weights (the last epoch's when ``val_fraction`` is 0 and
nothing is held out). It takes plain values, never a run spec.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from segcore.collection.store import open_store, read_manifest, store_root
from segcore.collection.versions import current_manifest
from segcore.config import VOLUME_DEFAULTS, train_defaults
from segcore.errors import ConfigError, StoreError
from segcore.fsio import file_sha256, without_secrets
from segcore.models import MODEL_KINDS, spatial_dims_of
from segcore.models.checkpoint import check_checkpoint_path, save_checkpoint
from segcore.collection.fingerprint import of_images, read_fingerprint
from segcore.normalise import Normalisation
from segcore.normalise_fit import choose_normalisation, describe, parse_normalisation
from segcore.training.init import load_init
from segcore.training.inputs import check_refit
from segcore.training.instance import train_instance
from segcore.training.semantic import train_semantic
from segcore.training.volumes import DEFAULT_VOLUME_PATCH, train_volumes
from segcore.training.settings import DEFAULT_MIN_EPOCH_PATCHES, Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training run left behind.

    Attributes:
        checkpoint: path of the written checkpoint (.safetensors).
        sha256: hex sha256 of its bytes.
        history: one record per epoch run (see the trainers).
        kind: ``semantic`` or ``instance``.
        best_val_score: the best epoch's mean foreground Dice (semantic) or F1 at IoU 0.5
            (instance); ``None`` when nothing was held out for validation.
        best_epoch: 1-based number of the best epoch, whose weights were kept; ``None`` when nothing
            was held out (``course["n_val"]`` 0: the last epoch was kept, ``course["epochs_run"]``).
        best_val: the best epoch's validation figures (e.g. ``{"val_dice": {class: Dice}}``);
            ``None`` when nothing was held out.
        normalisation: how inputs are normalised, in words (fitted values included), and how it
            was chosen (``normalisation_choice``).
        largest_region: semantic models: whether the masks keep only each image's largest
            foreground region, and the validation figures it was decided by (the provenance's record;
            volumetric models never keep it).
        refit: semantic models trained with ``refit``: what the refit on every image did (the
            provenance's record, :func:`segcore.training.validation.refit_on_all`); else ``None``.
        course: how training went, from the provenance: ``epochs`` asked and ``epochs_run``,
            ``stopped_early`` (the time budget, ``time_budget_s``, ended it), the share asked to be
            held out (``val_fraction``), the validation split (``val_split``; ``None`` when nothing
            was held out) and the images (volumes) trained on and held out (``n_train``, ``n_val``);
            the keys the trainer recorded.
        model: the architecture trained (e.g. ``unet``, ``unet3d``).
    """

    checkpoint: str
    sha256: str
    history: list[dict]
    kind: str
    best_val_score: float | None
    best_epoch: int | None = None
    best_val: dict[str, Any] | None = None
    normalisation: str = ""
    normalisation_choice: dict[str, Any] | None = None
    largest_region: dict[str, Any] | None = None
    refit: dict[str, Any] | None = None
    course: dict[str, Any] | None = None
    model: str = ""


#: The provenance keys that say how training went (:attr:`TrainResult.course`).
COURSE_KEYS = ("epochs", "epochs_run", "stopped_early", "time_budget_s", "val_fraction", "val_split", "n_train",
               "n_val")


def epoch_line(record: Mapping[str, Any], *, epochs: int) -> str:
    """One line about a history record: ``epoch 2/10: loss 0.4123, val_f1 0.812, ... (3.1 s)``
    (every float ``val_*`` entry, three decimals; a per-class mapping such as ``val_dice`` as
    ``val_dice liver 0.912/tumour 0.701``, its first class (background) left out; a run that holds
    nothing out has none: ``epoch 2/10: loss 0.4123 (3.1 s)``). A refit epoch's
    record (``"stage": "refit"``, see :func:`segcore.training.validation.refit_on_all`) reads
    ``refit epoch 2/8: loss 0.3012 (3.0 s)``; the epoch after which the time budget stops training
    ends with ``; time budget spent, stopping``."""
    parts = []
    for k, v in record.items():
        if k.startswith("val_") and isinstance(v, float):
            parts.append(f"{k} {v:.3f}")
        elif k.startswith("val_") and isinstance(v, Mapping) and len(v) > 1:  # e.g. val_dice per class, background left out
            parts.append(f"{k} " + "/".join(f"{name} {x:.3f}" for name, x in list(v.items())[1:]))
    scores = ", ".join(parts)
    stage = "refit epoch" if record.get("stage") == "refit" else "epoch"
    return (f"{stage} {record['epoch']}/{epochs}: loss {record['loss']:.4f}{', ' if scores else ''}{scores} "
            f"({record['seconds']:.1f} s){'; time budget spent, stopping' if record.get('time_budget_spent') else ''}")


def unit_of(result: Mapping[str, Any]) -> str:
    """``volumes`` or ``images``: what a training run (a :class:`TrainResult` as a dict) counted in
    ``course`` (``n_train``, ``n_val``), by its model's spatial dimensions."""
    model = result.get("model")
    return "volumes" if model in MODEL_KINDS and spatial_dims_of(model) == 3 else "images"


def no_validation_note(result: Mapping[str, Any]) -> str | None:
    """What a run that held nothing out kept, in words, e.g. ``no validation (val fraction 0): trained
    on all 6 images; the checkpoint holds the last epoch's weights (epoch 3 of 3), not a best epoch``;
    ``None`` for a run with a validation split. ``result``: a :class:`TrainResult` as a dict."""
    course = result.get("course") or {}
    if course.get("n_val", 1) != 0:
        return None
    run, n = course.get("epochs_run", len(result.get("history") or ())), course.get("n_train")
    what = f"the one {unit_of(result).removesuffix('s')}" if n == 1 else f"all {n} {unit_of(result)}"
    return (f"no validation (val fraction 0): trained on {what}; the "
            f"checkpoint holds the last epoch's weights (epoch {run} of {course.get('epochs', run)}), not a best epoch")


def _resolve_normalisation(norm: Normalisation | str, store: str, images: np.ndarray
                           ) -> tuple[Normalisation, dict[str, Any]]:
    """The scheme to train with (unfitted) and a record of how it was chosen."""
    asked = norm if isinstance(norm, str) else norm.mode
    parsed = parse_normalisation(norm) if isinstance(norm, str) else norm
    if parsed != "auto":
        if parsed.mode == "range" and parsed.scale == 255.0:  # meant for 8-bit images: say when these are not
            fp = read_fingerprint(store) or of_images(images)
            if fp.get("negative") or float(fp["max"]) > 255.0:
                picked = choose_normalisation(fp)[0]
                log.warning("normalisation range divides by 255, for 8-bit images; these hold %g..%g (%s): "
                            "auto would pick %s", float(fp["min"]), float(fp["max"]), fp["dtype"], picked.mode)
        return parsed, {"asked": asked, "chose": parsed.mode, "reason": "given"}
    fp = read_fingerprint(store)
    source = "store fingerprint"
    if fp is None:
        fp, source = of_images(images), "training images (the store has no fingerprint)"
    chosen, reason = choose_normalisation(fp)
    log.info("normalisation auto -> %s: %s (from the %s)", chosen.mode, reason, source)
    return chosen, {"asked": "auto", "chose": chosen.mode, "reason": reason, "fingerprint": fp, "source": source}


def labelled_slots(store_path: str) -> tuple[dict[str, list[int]], list[str]]:
    """Where the images with usable ground truth lie: ``{group: [index, ...]}`` (groups in store
    order, indices ascending) and their ids in that order. Reads the manifest only, so a store that
    cannot be trained on is told before any work.

    The images may lie in several store groups (the batches of an incremental store, the slices of
    volumes) as long as they share one shape (height, width, channels) and pixel type; images of
    several raise :class:`StoreError`, which names them (8- and 16-bit images would otherwise be
    promoted to one type without a word, and one normalisation would not fit both).
    """
    info = open_store(store_path)
    if not info.has_gt:
        raise StoreError(f"store {store_path!r} has no ground truth; ingest it with --masks to train on it")
    order = {g.name: k for k, g in enumerate(info.groups)}
    current = current_manifest(read_manifest(store_path)).to_pylist()
    rows = sorted((r for r in current if r["status"] == "ok" and r["mask_status"] == "ok"),
                  key=lambda r: (order[r["group"]], r["index"]))
    if not rows:
        raise StoreError(f"store {store_path!r} has no readable image with usable ground truth to train on")
    refused = [r for r in current if r["status"] == "ok" and r["mask_status"] == "error"]
    if refused:
        log.warning("%d image(s) left out of training, their mask could not be used: %s", len(refused),
                    "; ".join(f"{r['image_id']} ({r['mask_error']})" for r in refused[:3])
                    + ("; ..." if len(refused) > 3 else ""))
    by_group: dict[str, list[int]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r["index"])
    shapes: dict[tuple[int, int, int, str], list[str]] = {}
    for name in by_group:
        g = info.group(name)
        shapes.setdefault((g.height, g.width, g.channels, g.dtype), []).append(name)
    if len(shapes) > 1:
        said = "; ".join(f"{h}x{w}x{c} {t} ({sum(len(by_group[n]) for n in names)} image(s) in {', '.join(names)})"
                         for (h, w, c, t), names in sorted(shapes.items()))
        raise StoreError(f"training needs images of one shape and pixel type (height x width x channels, dtype); "
                         f"store {store_path!r} has labelled images of {len(shapes)}: {said}. Ingest the images of "
                         "one shape and type into a store of their own to train on them")
    return by_group, [r["image_id"] for r in rows]


def read_labelled(store_path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images that have usable ground truth: ``(N, H, W, C)`` images, ``(N, H, W)`` labels, ids,
    in the order of :func:`labelled_slots` (which refuses images of several shapes)."""
    by_group, ids = labelled_slots(store_path)
    root = store_root(store_path)
    images = [root[f"images/{name}"][:][idx] for name, idx in by_group.items()]
    labels = [root[f"gt/{name}"][:][idx] for name, idx in by_group.items()]
    if len(images) == 1:
        return images[0], labels[0], ids
    return np.concatenate(images), np.concatenate(labels), ids




def labelled_volumes(store: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every volume of ``store`` whose slices all have usable ground truth: ``(N, D, H, W, C)``
    voxels, ``(N, D, H, W)`` labels and the volume ids. Training takes volumes of one shape: a store
    whose labelled volumes differ in shape (or that holds none) raises :class:`StoreError`."""
    info = open_store(store)
    if not info.has_gt:
        raise StoreError(f"store {store!r} has no ground truth; ingest it with --masks to train on it")
    rows = [r for r in current_manifest(read_manifest(store)).to_pylist() if r["volume_id"] and r["status"] == "ok"]
    by_volume: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_volume.setdefault(r["volume_id"], []).append(r)
    usable = {v: sorted(rs, key=lambda r: r["slice"]) for v, rs in sorted(by_volume.items())
              if all(r["mask_status"] == "ok" for r in rs) and len(rs) == rs[0]["depth"]}
    refused = {v: next(r["mask_error"] for r in rs if r["mask_status"] == "error")
               for v, rs in sorted(by_volume.items()) if any(r["mask_status"] == "error" for r in rs)}
    if refused:
        log.warning("%d volume(s) left out of training, their mask could not be used: %s", len(refused),
                    "; ".join(f"{v} ({why})" for v, why in list(refused.items())[:3]) + ("; ..." if len(refused) > 3
                                                                                         else ""))
    if not usable:
        raise StoreError(f"store {store!r} holds no volume with ground truth on every slice; a volumetric model "
                         "trains on volumes (NIfTI, TIFF z-stacks, Zarr, DICOM) ingested with their masks")
    groups = {v: info.group(rs[0]["group"]) for v, rs in usable.items()}
    shapes = {(g.count, g.height, g.width, g.channels) for g in groups.values()}
    if len(shapes) != 1:
        raise StoreError(f"training needs volumes of one shape; store {store!r} has labelled volumes of shapes "
                         f"{sorted(shapes)} (depth, height, width, channels)")
    root = store_root(store)
    images = np.stack([root[f"images/{g.name}"][:] for g in groups.values()])
    labels = np.stack([root[f"gt/{g.name}"][:] for g in groups.values()])
    return images, labels, list(groups)


def train_from_store(
    *,
    store: str,
    out: str,
    model: str,
    class_names: Sequence[str] | None,
    arch_kwargs: Mapping[str, Any] | None,
    epochs: int,
    batch_size: int | None,
    lr: float | None,
    val_fraction: float,
    crop_size: int | None,
    seed: int,
    time_budget_s: float | None,
    normalisation: Normalisation | str | None,
    command: str,
    on_epoch: Callable[[dict], None] | None = None,
    init: str | None = None,
    val_split: str = "auto",
    group_pattern: str | None = None,
    patch_size: int | None = None,
    schedule: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    largest_region: str | None = None,
    min_epoch_patches: int | None = None,
    refit: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``model`` on every labelled image of ``store`` and write the best epoch (``val_fraction``
    0: the last) to ``out``.

    Args:
        store: a collection store made by ``segflow ingest``, with ground truth of one image shape.
            Instance models need ``mask_kind="instance"``; a semantic model trained on instance
            labels learns foreground (any id > 0 = class 1).
        out: checkpoint file to write (.safetensors).
        model: a registered architecture (``unet``, ``unet3d``, ``maskrcnn``, ``maskrcnn_r18``). A
            volumetric one (``unet3d``) trains on the store's labelled volumes
            (:func:`labelled_volumes`) in 3-D patches (``patch_size`` voxels per side, default
            :data:`~segcore.training.volumes.DEFAULT_VOLUME_PATCH`), with :data:`VOLUME_DEFAULTS`.
        class_names: background first; ``None``: background plus ``class_<k>`` per label value up
            to the largest in the store (semantic), or ``("background", "object")`` (instance).
        arch_kwargs: builder options merged over the kind's defaults (``None``: the defaults).
        epochs, val_fraction, crop_size, seed, time_budget_s: as the trainers take them
            (``crop_size`` applies to instance models only). ``val_fraction`` 0 holds out nothing:
            every image (volume) is trained on and the last epoch is saved, so a store of one
            labelled volume (or image) can train a model.
        normalisation: a :class:`Normalisation` or a choice (:func:`segcore.normalise_fit.parse_normalisation`);
            ``auto`` picks from the store's fingerprint (:func:`choose_normalisation`) and the pick
            and its reason go to the log and the provenance (``normalisation_choice``).
        batch_size, lr: ``None`` takes the kind's default.
            ``None``: the parent's with ``init``, else ``auto``.
        command: the command line that started the run (recorded in the provenance).
        on_epoch: called once per epoch with that epoch's history record.
        init: a torch model record to fine-tune (:func:`segcore.training.init.load_init`): its
            architecture and options are kept (``model`` must name it; ``arch_kwargs`` must be
            ``None``), its head is replaced when ``class_names`` differ from its classes, and the
            provenance records it under ``init`` (path, sha256, classes, ``head_replaced``).
        val_split, group_pattern: semantic models: ``auto`` (``group`` with a pattern, else ``tail``),
            ``random``, ``tail`` or ``group`` (see :func:`segcore.training.recipe.split_indices`); not
            used with ``val_fraction`` 0 (no split).
        patch_size, schedule, largest_region: semantic models: the :class:`Recipe` values (``None``: its
            defaults).
        min_epoch_patches: semantic models: patches drawn per epoch at least (``None``:
            :data:`~segcore.training.settings.DEFAULT_MIN_EPOCH_PATCHES` for 2-D models, 0 for
            volumetric ones, whose patches cost far more; 0: one per training image or volume).
        refit: semantic models: after training with the validation split, train again on every image
            for the best epoch's number of epochs and save that model (``Recipe.refit``); refused
            with ``val_fraction`` 0 (:func:`~segcore.training.inputs.check_refit`).
        device, precision: a resolved device (cpu, cuda, cuda:N) and CUDA autocast dtype.
        overwrite: replace a file already at ``out``; without it that is refused before any training
            (:func:`~segcore.models.checkpoint.check_checkpoint_path`).

    Returns:
        A :class:`TrainResult`; the checkpoint's provenance also records ``command``, ``store``
        and ``images`` (how many were used, validation included).
    """
    kind = MODEL_KINDS.get(model)
    if kind is None:
        raise ConfigError(f"unknown model {model!r}; valid names: {', '.join(sorted(MODEL_KINDS))}")
    if crop_size is not None and kind != "instance":
        raise ConfigError(f"crop_size applies to instance models only; leave it out for {model!r}")
    if refit and kind == "instance":
        raise ConfigError(f"refit applies to semantic models only; leave it out for {model!r}")
    check_refit(refit, val_fraction)  # before the store is read
    check_checkpoint_path(out, overwrite=overwrite)  # before any training
    volumetric = kind == "semantic" and spatial_dims_of(model) == 3
    defaults = VOLUME_DEFAULTS if volumetric else train_defaults(kind)
    mask_kind = open_store(store).mask_kind
    images, labels, ids = labelled_volumes(store) if volumetric else read_labelled(store)
    start = None
    if init is not None:
        if arch_kwargs:
            raise ConfigError("with --init the architecture and its options are the parent model's; leave out "
                              f"the architecture options {sorted(arch_kwargs)}")
        start = load_init(init, arch=model, in_channels=int(images.shape[-1]) if images.ndim >= 4 else 1,
                          class_names=class_names, seed=seed)
        class_names = class_names or start.parent.class_names
        arch_kwargs = dict(start.parent.arch_kwargs)
        normalisation = start.parent.normalisation if normalisation is None else normalisation
    normalisation, choice = _resolve_normalisation("auto" if normalisation is None else normalisation, store,
                                                   images.reshape((-1,) + images.shape[-3:]))  # volumes: slices
    common = dict(
        normalisation=normalisation, epochs=epochs, init=None if start is None else start.model,
        val_fraction=val_fraction, seed=seed, progress=on_epoch,
        time_budget_s=time_budget_s, arch_kwargs={**defaults["arch_kwargs"], **(arch_kwargs or {})},
        batch_size=defaults["batch_size"] if batch_size is None else batch_size,
        lr=defaults["lr"] if lr is None else lr,
    )
    if kind == "instance":
        if mask_kind != "instance":
            raise ConfigError(f"{model} learns from instance labels; ingest {store} with --mask-kind instance")
        names = tuple(class_names or ("background", "object"))
        net, meta, history = train_instance(images, labels.astype(np.int64), arch=model, class_names=names,
                                            crop_size=crop_size, device=device, schedule=schedule or "onecycle",
                                            precision=precision if str(device).startswith("cuda") else "fp32",
                                            **common)
        best = (meta.provenance.get("val_scores") or {}).get("f1")
    else:
        if mask_kind == "instance":
            labels = (labels > 0).astype(labels.dtype)
        names = tuple(class_names or ("background",) + tuple(f"class_{k}" for k in range(1, int(labels.max()) + 1)))
        split = val_split if val_split != "auto" else ("group" if group_pattern else "tail")
        # the CPU trains in fp32 whatever was asked: the recipe records what ran
        ran_precision = precision if str(device).startswith("cuda") else "fp32"
        recipe = Recipe(device=device, precision=ran_precision, refit=refit, **{k: v for k, v in
                                                                (("patch_size", None if volumetric else patch_size),
                                                                 ("schedule", schedule),
                                                                 ("largest_region", largest_region),
                                                                 ("min_epoch_patches", min_epoch_patches
                                                                  if min_epoch_patches is not None or volumetric
                                                                  else DEFAULT_MIN_EPOCH_PATCHES)) if v is not None})
        if volumetric:
            net, meta, history = train_volumes(images, labels.astype(np.int64), arch=model, class_names=names,
                                               ids=ids, val_split=split, group_pattern=group_pattern, recipe=recipe,
                                               patch_size=DEFAULT_VOLUME_PATCH if patch_size is None else patch_size,
                                               **common)
        else:
            net, meta, history = train_semantic(images, labels.astype(np.int64), class_names=names, ids=ids,
                                                val_split=split, group_pattern=group_pattern, recipe=recipe, **common)
        best = meta.provenance.get("val_dice_mean_fg")
    provenance = dict(meta.provenance, command=without_secrets(command), store=without_secrets(store), images=len(ids),
                      normalisation_choice=choice,
                      **({} if start is None else {"init": start.provenance}))
    path = save_checkpoint(out, net, meta.model_copy(update={"provenance": provenance}))
    log.info("trained %s on %d image(s) of %s; checkpoint %s", model, len(ids), store, path)
    validated = bool(meta.provenance.get("n_val"))  # nothing held out: no best epoch, no figures
    best_epoch = meta.provenance.get("best_epoch") if validated else None
    best_val = ({k: v for k, v in meta.provenance.items()
                 if k.startswith("val_") and k not in ("val_ids", "val_split", "val_fraction")} if validated else None)
    return TrainResult(checkpoint=str(path), sha256=file_sha256(path), history=history, kind=kind,
                       best_val_score=best, best_epoch=best_epoch, best_val=best_val,
                       normalisation=describe(meta.normalisation), normalisation_choice=choice,
                       largest_region=meta.provenance.get("largest_region"), refit=meta.provenance.get("refit"),
                       course={k: meta.provenance[k] for k in COURSE_KEYS if k in meta.provenance}, model=model)


__all__ = ["TrainResult", "VOLUME_DEFAULTS", "epoch_line", "labelled_slots", "labelled_volumes", "no_validation_note",
           "read_labelled",
           "train_from_store", "unit_of"]
