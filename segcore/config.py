"""Validated, frozen run specs. A flow takes one spec as its parameter (the Prefect UI renders
it as a form); sub-specs go to tasks; plain values go into segcore functions. An override left
as ``None`` keeps the default. The resolved spec is saved with the outputs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from segcore.normalise import Normalisation


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IngestSpec(_Spec):
    """Decode a collection of image files (and optional ground-truth masks) into a Zarr store."""

    images: str = Field(description="Directory of images, or a glob pattern (quote it in a shell).")
    store: str = Field(description="Path of the Zarr collection store to create, e.g. collection.zarr.")
    masks: str | None = Field(None, description="Directory of ground-truth masks; a mask pairs with the image of the same id.")
    mask_kind: Literal["class", "instance"] = Field(
        "class", description="'class': mask values are class ids; 'instance': values are object ids (0 = background)."
    )
    chunk_pixels: int = Field(4_194_304, gt=0, description="Target pixels per chunk (= per inference work unit).")
    max_chunk_images: int = Field(64, gt=0, description="At most this many images per chunk.")
    probe_batch: int = Field(256, gt=0, description="Files probed per ingest task.")
    overwrite: bool = Field(False, description="Replace an existing store at the same path.")


class ExecutionSpec(_Spec):
    """Where the work runs: an existing Dask scheduler, or a local cluster of worker processes."""

    dask_address: str | None = Field(None, description="tcp://host:port of an existing Dask scheduler.")
    n_workers: int | None = Field(None, gt=0, description="Local cluster workers (default: one per GPU, else 1).")
    threads_per_worker: int | None = Field(
        None, gt=0, description="Torch threads per worker (default: CPU cores / workers)."
    )


class SegmentSpec(_Spec):
    """Segment every work unit of a store with one checkpoint and evaluate Dice where GT exists."""

    store: str = Field(description="Zarr collection store made by 'segflow ingest'.")
    checkpoint: str = Field(description="segflow checkpoint (.safetensors) to segment with.")
    out: str = Field(description="Run directory: masks.zarr, dice/ Parquet dataset, summary.")
    batch_size: int = Field(8, gt=0, description="Images per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when present.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Autocast dtype on CUDA (CPU runs fp32).")
    execution: ExecutionSpec = ExecutionSpec()


class RunSpec(_Spec):
    """Ingest + segment + evaluate in one flow run."""

    ingest: IngestSpec
    segment: SegmentSpec

    @model_validator(mode="after")
    def _same_store(self) -> "RunSpec":
        if self.ingest.store != self.segment.store:
            raise ValueError(f"ingest.store ({self.ingest.store}) and segment.store ({self.segment.store}) differ")
        return self


class TrainSpec(_Spec):
    """Train a semantic UNet on the labelled images of a store; the best epoch is saved."""

    store: str = Field(description="Zarr collection store with ground truth (class masks).")
    out: str = Field(description="Checkpoint file to write (.safetensors).")
    model: Literal["unet"] = Field("unet", description="Registered architecture to train.")
    class_names: tuple[str, ...] | None = Field(
        None, description="Class names, background first (default: background, class_1, ... from the labels)."
    )
    base: int = Field(16, gt=0, description="UNet width of the first stage.")
    depth: int = Field(3, gt=0, description="UNet pooling stages.")
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW, one-cycle schedule).")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="Fraction held out for validation each epoch.")
    seed: int = 0
    time_budget_s: float | None = Field(None, gt=0, description="Stop after the epoch that passes this budget.")
    normalisation: Normalisation = Normalisation()
    execution: ExecutionSpec = ExecutionSpec()
