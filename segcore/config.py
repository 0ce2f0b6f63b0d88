"""Validated, frozen run specs. A flow takes one spec as its parameter (the Prefect UI renders
it as a form); sub-specs go to tasks; plain values go into segcore functions. An override left
as ``None`` keeps the default. The resolved spec is saved with the outputs.
"""

from __future__ import annotations

import datetime as dt
import inspect
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from segcore import fsio
from segcore.collection.grouping import compile_pattern
from segcore.normalise import Normalisation
from segcore.normalise_fit import parse_normalisation


def _store_location(location: str) -> str:
    if not location.strip():
        raise ValueError("the collection store's location is empty; pass a path or an fsspec URL")
    return location


#: Location of a collection store: a path, or an fsspec URL (``s3://bucket/collection.zarr``) that the
#: Dask workers read directly (no shared file system needed).
StorePath = Annotated[str, AfterValidator(_store_location)]


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


_S = TypeVar("_S", bound=_Spec)


class IngestSpec(_Spec):
    """Decode a collection of image files (and optional ground-truth masks) into a Zarr store."""

    images: str = Field(description="Directory of images, a glob pattern (quote it in a shell), or the fsspec URL of "
                                    "a directory (s3://bucket/landing; its files are staged locally to be decoded).")
    store: StorePath = Field(description="Path or fsspec URL (s3://bucket/collection.zarr) of the Zarr collection "
                                         "store to create, e.g. collection.zarr; {flow_run} in it is replaced by the "
                                         "run's UTC start time and flow run id.")
    masks: str | None = Field(None, description="Directory (or directory URL) of ground-truth masks; a mask pairs with "
                                                "the image of the same id.")
    mask_kind: Literal["class", "instance"] = Field(
        "class", description="'class': mask values are class ids; 'instance': values are object ids (0 = background)."
    )
    chunk_pixels: int = Field(4_194_304, gt=0, description="Target pixels per chunk (= per inference work unit).")
    max_chunk_images: int = Field(64, gt=0, description="At most this many images per chunk.")
    tile_chunk: int = Field(
        1024, ge=0, description="Images larger than chunk_pixels are stored in square chunks of this side, each "
                                "one work unit of tiled inference; 0 keeps whole images per chunk.")
    probe_batch: int = Field(256, gt=0, description="Files probed per ingest task.")
    overwrite: bool = Field(False, description="Replace an existing store at the same path.")
    incremental: bool = Field(
        False, description="Treat 'images' as a landing zone: append to the store only files whose content "
                           "(sha256) it has not seen; a file whose content or mask changed supersedes its old "
                           "version.")
    wait_for_lease: float = Field(
        0, ge=0, description="Seconds to wait while another process ingests into the same store before refusing "
                             "(0: refuse at once, naming it).")

    @model_validator(mode="after")
    def _one_mode(self) -> "IngestSpec":
        if self.incremental and self.overwrite:
            raise ValueError("incremental (append new files) and overwrite (replace the store) exclude each other")
        if self.incremental and FLOW_RUN in self.store:
            raise ValueError(f"an incremental ingest appends to the same store from run to run; {FLOW_RUN} in store "
                             "would give every run a new one: remove it")
        return self


#: In the store and run-directory locations of a spec (``IngestSpec.store``, ``SegmentSpec.store``,
#: ``SegmentSpec.out``), replaced when the flow run starts by :func:`flow_run_token`: a location
#: of its own for every run (e.g. ``runs/{flow_run}/run``).
FLOW_RUN = "{flow_run}"


def flow_run_token(started: dt.datetime, flow_run_id: str) -> str:
    """``<UTC start, 20261124T180000Z>-<first 8 hex digits of the flow run id>``: sorts by time, and
    names the flow run (its id starts with those digits): the ``segflow-run`` (``-ingest``,
    ``-segment``) flow run that fills it in and holds the artifacts; under a deployment, a subflow
    of the deployment's run."""
    return f"{started.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{str(flow_run_id).replace('-', '')[:8]}"


def with_flow_run(spec: _S, token: str) -> _S:
    """``spec`` (an IngestSpec, SegmentSpec or RunSpec) with :data:`FLOW_RUN` in its locations replaced by ``token``."""
    if isinstance(spec, RunSpec):
        return spec.model_copy(update={"ingest": with_flow_run(spec.ingest, token),
                                       "segment": with_flow_run(spec.segment, token)})
    fields = ("store", "out") if isinstance(spec, SegmentSpec) else ("store",)
    return spec.model_copy(update={f: getattr(spec, f).replace(FLOW_RUN, token) for f in fields})


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise ValueError(f"device {text!r} is not one of auto, cpu, cuda, cuda:N")
    return text


#: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
DeviceChoice = Annotated[str, AfterValidator(_device)]


class ExecutionSpec(_Spec):
    """Where the work runs: an existing Dask scheduler, or a local cluster of worker processes."""

    dask_address: str | None = Field(None, description="tcp://host:port of an existing Dask scheduler.")
    n_workers: int | None = Field(None, gt=0, description="Local cluster workers (default: one per GPU, else 1).")
    threads_per_worker: int | None = Field(
        None, gt=0, description="Torch threads per worker (default: CPU cores / workers)."
    )


class SegmentSpec(_Spec):
    """Segment every work unit of a store with one checkpoint and evaluate Dice where GT exists."""

    store: StorePath = Field(description="Zarr collection store made by 'segflow ingest': a path or an fsspec URL "
                                         "(s3://bucket/collection.zarr), read by the workers directly.")
    checkpoint: str = Field(description="Model record to segment with: a segflow checkpoint (.safetensors) or a "
                                        "model directory, at a path or an fsspec URL (s3://bucket/unet.safetensors).")
    out: str = Field(description="Run directory, a path or fsspec URL (s3://bucket/runs/r1): masks.zarr, dice/ "
                                  "Parquet dataset, summary. {flow_run} in it (and in a store path) is replaced by "
                                  "the run's UTC start time and flow run id: a new directory per run.")
    batch_size: int = Field(8, gt=0, description="Images per forward pass (tiles of large images: at most 1 Mpx "
                                                  "per pass).")
    device: DeviceChoice = Field("auto", description="auto (CUDA when present, one GPU per worker), cpu, cuda, or "
                                                     "cuda:N (every worker on GPU N).")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Autocast dtype on CUDA (CPU runs fp32).")
    compile: bool = Field(False, description="Semantic torch models: run the model through torch.compile (its "
                                             "warm-up is paid once per worker; the model runs eagerly when "
                                             "compiling fails).")
    tile_size: int | None = Field(
        None, ge=0, description="Large images: model tile in pixels (semantic models: default 512, rounded up to "
                                "the UNet's divisor; instance models: detector core, default 256); 0 disables "
                                "tiling (large images are segmented whole).")
    overlap: int | None = Field(
        None, ge=0, description="Large images: pixels shared by neighbouring semantic tiles (default tile/4), or, "
                                "for instance models, the halo around each detector core (default 64; must exceed "
                                "the largest object).")
    blend: Literal["gaussian", "linear"] = Field(
        "gaussian",
        description="How overlapping semantic tiles are weighted: gaussian (sigma = tile/8) or linear ramps.")
    tta: bool = Field(False, description="Semantic models: average logits over flips, whole images and tiles alike "
                                         "(4x compute).")
    volume_pattern: str | None = Field(
        None, description="Score 2-D images per volume too: a regular expression on image ids whose first group "
                          "(or whole match) names the volume, e.g. '^(.+)_z\\d+$'. Ingested volumes (NIfTI, TIFF "
                          "z-stacks) are always scored per volume.")
    lake: str | None = Field(
        None, description="Data-lake location (path or fsspec URL such as s3://bucket/segflow): the Dice, instance "
                          "and manifest tables of every run are appended there, Hive-partitioned by run_date and model.")
    unit_timeout_floor: float = Field(
        60.0, gt=0, description="Seconds a work unit (or block) is always given before it counts as hung. Its "
                                "timeout is 5 x the median seconds per image of the run's finished units x its "
                                "images, at least this floor and at most unit_timeout_cap.")
    unit_timeout_cap: float = Field(
        3600.0, gt=0, description="Most seconds a work unit (or block) is given; also the timeout of units that start "
                                  "before any has finished. A hung unit is stopped (its Dask worker restarted) and "
                                  "retried.")
    unit_retries: int = Field(
        2, ge=0, description="Further attempts of a unit that fails or times out, after 2 s, 4 s, ...; a unit that "
                             "still fails is recorded in RUN_DIR/failed/ and the run fails naming it (the same "
                             "command redoes only the failed units).")
    wait_for_lease: float = Field(
        0, ge=0, description="Seconds to wait while another process writes into the same run directory before "
                             "refusing (0: refuse at once, naming it).")
    execution: ExecutionSpec = ExecutionSpec()

    @model_validator(mode="after")
    def _volume_pattern(self) -> "SegmentSpec":
        if self.volume_pattern:
            compile_pattern(self.volume_pattern, what="volume_pattern")  # a ConfigError is a ValueError
        return self

    @model_validator(mode="after")
    def _timeout_bounds(self) -> "SegmentSpec":
        if self.unit_timeout_floor > self.unit_timeout_cap:
            raise ValueError(f"unit_timeout_floor ({self.unit_timeout_floor} s) exceeds unit_timeout_cap "
                             f"({self.unit_timeout_cap} s); raise the cap or lower the floor")
        return self


class RunSpec(_Spec):
    """Ingest + segment + evaluate in one flow run."""

    ingest: IngestSpec
    segment: SegmentSpec

    @model_validator(mode="after")
    def _same_store(self) -> "RunSpec":
        if self.ingest.store != self.segment.store:
            raise ValueError(f"ingest.store ({self.ingest.store}) and segment.store ({self.segment.store}) differ")
        if self.ingest.incremental and FLOW_RUN in self.segment.out:
            raise ValueError(f"an incremental run keeps its run directory from run to run; {FLOW_RUN} in "
                             "segment.out would give every run a new one: remove it")
        return self


def _normalisation_choice(text: str) -> str:
    parse_normalisation(text)  # raises ConfigError (a ValueError) with the valid choices
    return text.strip().lower()


#: ``auto``, ``percentile``, ``range``, ``zscore``, ``ct``, ``window:LO,HI`` or ``window:<preset>``.
NormalisationChoice = Annotated[str, AfterValidator(_normalisation_choice)]


def _val_fraction(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must lie in [0, 1): the share of the labelled images held out for validation, 0 for none "
                         f"(train on every image and keep the last epoch); got {value!r}")
    return value


#: Share of the labelled images held out for validation, in ``[0, 1)``; 0 holds out none (the
#: bounds are checked with a message that says so, and shown to the Prefect form by the schema).
ValFraction = Annotated[float, AfterValidator(_val_fraction),
                        Field(json_schema_extra={"minimum": 0, "exclusiveMaximum": 1})]


class TrainSpec(_Spec):
    """Train a registered model on the labelled images of a store; the best epoch is saved.

    Semantic models (``unet``, ``unet3d``) learn from class masks; instance models (``maskrcnn``,
    ``maskrcnn_r18``) from instance labels (ingest with ``mask_kind="instance"``). Options left
    as ``None`` take the model kind's defaults (see :func:`train_defaults`). With ``val_fraction``
    0 nothing is held out and the last epoch is saved instead of the best.
    """

    store: StorePath = Field(description="Zarr collection store with ground truth (a path or an fsspec URL).")
    out: str = Field(description="Checkpoint file to write (.safetensors).")
    overwrite: bool = Field(False, description="Replace a checkpoint already at out (without it, an existing "
                                               "file is refused before any training).")
    model: str = Field("unet", description="Registered architecture: unet, unet3d (volumes), maskrcnn or "
                                           "maskrcnn_r18.")
    class_names: tuple[str, ...] | None = Field(
        None, description="Class names, background first (default: background + one name per label value, "
                          "or background, object for instance models)."
    )
    arch_kwargs: dict[str, Any] | None = Field(
        None, description="Builder options, merged over the kind's defaults, e.g. {'base': 32} for the UNet "
                          "or {'score_threshold': 0.5} for Mask R-CNN.")
    epochs: int = Field(50, gt=0, description="Passes over the training split (UNet: each as many patches as training "
                                              "images, and at least min_epoch_patches).")
    batch_size: int | None = Field(None, gt=0, description="Default 16 (UNet) or 4 (instance models).")
    lr: float | None = Field(None, gt=0, allow_inf_nan=False,
                             description="Peak learning rate (AdamW, under the schedule).")
    val_fraction: ValFraction = Field(
        0.15, description="Fraction of the labelled images (volumes for unet3d) held out for validation each epoch; "
                          "0: no validation: train on every one and keep the last epoch (one image or volume is "
                          "then enough; refit is refused and largest_region auto stays off).")
    crop_size: int | None = Field(None, gt=0, description="Instance models: train on random square crops.")
    seed: int = 0
    time_budget_s: float | None = Field(None, gt=0, description="Stop after the epoch that passes this budget.")
    normalisation: Normalisation | NormalisationChoice | None = Field(
        None, description="A choice (auto, percentile, range, zscore, ct, window:LO,HI, window:abdomen, ...) or a "
                           "full normalisation record; auto picks from the store's fingerprint, zscore and ct are "
                           "fitted on the training split and stored with the model. Default: the --init model's, "
                           "else auto.")
    val_split: Literal["auto", "random", "tail", "group"] = Field(
        "auto", description="Validation images: random, tail (the last image ids in natural order: a contiguous "
                            "hold-out of consecutive slices) or group (whole groups of group_pattern); auto: group "
                            "with a group_pattern, else tail (UNet); random for instance models. With "
                            "val_fraction 0 no split is made.")
    group_pattern: str | None = Field(
        None, description="Regular expression on image ids naming an image's volume or source (its first capture "
                          "group, or the match); images of one group never straddle the validation split. UNet "
                          "models, with val_split group or auto.")
    patch_size: int | None = Field(None, gt=0, description="UNet: training patch side (default 256; smaller images "
                                                           "are taken whole); unet3d: the side of its cubic 3-D "
                                                           "patches (default 32x64x64).")
    schedule: Literal["onecycle", "poly", "cosine"] | None = Field(
        None, description="Learning-rate schedule (UNet default: poly with a 5 % linear warm-up; Mask R-CNN: "
                          "onecycle).")
    min_epoch_patches: int | None = Field(
        None, ge=0, description="UNet: patches drawn per epoch at least (default 256: a small collection still gets "
                                "16 optimiser steps per epoch); an epoch draws one per training image when they "
                                "are more; 0: always one per training image. unet3d: default 0 (one patch per "
                                "training volume), a larger value draws more patches of its volumes per epoch.")
    largest_region: Literal["auto", "on", "off"] | None = Field(
        None, description="UNet: keep only each image's largest connected foreground region in the model's masks; "
                          "auto (default) turns it on when it raises the validation mean foreground Dice (off with "
                          "val_fraction 0: nothing to decide by).")
    refit: bool = Field(
        False, description="UNet: after training with the validation split, train again on every image for the "
                           "best epoch's number of epochs and keep that model (the validation figures, "
                           "normalisation and largest-region decision stay those of the split run; training "
                           "takes about twice as long). Needs val_fraction above 0.")
    device: DeviceChoice = Field(
        "auto", description="Training device: auto (CUDA when present), cpu, cuda or cuda:N.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Autocast dtype on CUDA (CPU runs fp32).")
    init: str | None = Field(
        None, description="Model record to fine-tune (a segflow checkpoint or an imported torch model): its "
                          "weights, architecture and options are the start; its class head is replaced when "
                          "class_names differ. 'model' must name its architecture.")
    execution: ExecutionSpec = ExecutionSpec()

    @model_validator(mode="after")
    def _known_model(self) -> "TrainSpec":
        from segcore.models import MODELS, spatial_dims_of

        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid names: {', '.join(sorted(MODELS))}")
        accepted = set(inspect.signature(MODELS[self.model]).parameters) - {"in_channels", "num_classes"}
        unknown = sorted(set(self.arch_kwargs or {}) - accepted)
        if unknown:
            raise ValueError(f"model {self.model!r} takes no option(s) {unknown}; it accepts {sorted(accepted)}")
        if self.crop_size is not None and self.kind != "instance":
            raise ValueError("crop_size applies to instance models only")
        if self.init is not None and self.arch_kwargs:
            raise ValueError("with init, the architecture and its options (--base, --depth) are the parent "
                             "model's; leave them out")
        if self.val_split == "group" and not self.group_pattern:
            raise ValueError("val_split 'group' needs a group_pattern (a regular expression on the image ids)")
        if self.group_pattern:
            compile_pattern(self.group_pattern, what="group_pattern")  # a ConfigError is a ValueError
            if self.kind == "instance":
                raise ValueError("group_pattern applies to semantic models (unet, unet3d) only; instance models "
                                 "hold out a random split")
            if self.val_split in ("random", "tail"):
                raise ValueError(f"group_pattern keeps groups apart only with val_split group (or auto); with "
                                 f"{self.val_split} it would be ignored: leave one of them out")
        if self.init is not None and fsio.absolute(self.init) == fsio.absolute(self.out):
            raise ValueError("out is the init model being fine-tuned: it would be replaced; give a new name")
        if self.kind == "instance" and self.val_split not in ("auto", "random"):
            raise ValueError("instance models hold out a random validation split; leave val_split at auto")
        if self.largest_region is not None and self.kind == "instance":
            raise ValueError("largest_region applies to semantic models only")
        if self.refit and self.kind == "instance":
            raise ValueError("refit applies to semantic models only")
        if self.min_epoch_patches is not None and self.kind == "instance":
            raise ValueError("min_epoch_patches applies to semantic models (unet, unet3d) only")
        if self.largest_region == "on" and spatial_dims_of(self.model) == 3:
            raise ValueError("largest_region 'on' applies to 2-D models only; a volumetric model keeps every "
                             "foreground region")
        if self.kind == "instance" and self.patch_size is not None:
            raise ValueError("patch_size applies to semantic models (unet, unet3d) only; the Mask R-CNN trainer "
                             "takes crop_size (--crop-size) for its random crops")
        if self.patch_size is not None and self.model in ("unet", "unet3d") and self.init is None:
            defaults = VOLUME_DEFAULTS if self.model == "unet3d" else train_defaults("semantic")
            depth = int({**defaults["arch_kwargs"], **(self.arch_kwargs or {})}.get("depth", 3))
            if self.patch_size < 2 ** (depth + 1):
                raise ValueError(f"patch_size {self.patch_size} is too small for a UNet of depth {depth}: it halves "
                                 f"the patch {depth} times and needs at least 2 x 2 at the bottom, so at least "
                                 f"{2 ** (depth + 1)}")
        if self.class_names is not None:  # per-class figures are keyed by name: each must be one class's own
            empty = [i for i, n in enumerate(self.class_names) if not n.strip()]
            repeated = sorted({n for n in self.class_names if n.strip() and self.class_names.count(n) > 1})
            if empty or repeated or len(self.class_names) < 2:
                raise ValueError("class_names must be two or more distinct, non-empty names, background first; got "
                                 f"{list(self.class_names)}"
                                 + (f" (repeated: {', '.join(repeated)})" if repeated else ""))
        from segcore.training.inputs import check_refit

        check_refit(self.refit, self.val_fraction)  # a ConfigError is a ValueError
        return self

    @property
    def kind(self) -> str:
        from segcore.models import MODEL_KINDS

        return MODEL_KINDS[self.model]


#: Defaults of a volumetric model (``unet3d``): a lighter UNet and small batches of 3-D patches.
VOLUME_DEFAULTS: dict[str, Any] = {"arch_kwargs": {"base": 8, "depth": 3}, "batch_size": 2, "lr": 3e-3}


def train_defaults(kind: str) -> dict[str, Any]:
    """Defaults of TrainSpec options left as None, by model kind (a volumetric model's:
    :data:`VOLUME_DEFAULTS`)."""
    if kind == "instance":
        return {"arch_kwargs": {"score_threshold": 0.7, "overlap_threshold": 0.5}, "batch_size": 4, "lr": 1e-3}
    return {"arch_kwargs": {"base": 16, "depth": 3}, "batch_size": 16, "lr": 3e-3}
