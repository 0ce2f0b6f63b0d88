"""The embedded demo: a synthetic collection with exact ground truth, a UNet trained on part of
it by segflow itself, and the full pipeline (ingest -> segment -> Dice) on the held-out part."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.names import demo_run_name
from flows.pipeline import ingest_steps, segment_steps
from flows.train import train_steps
from segcore import synthetic
from segcore.training import semantic as training
from segcore.training import instance as training_instance
from segcore.config import ExecutionSpec, IngestSpec, SegmentSpec, TrainSpec
from segcore.errors import ConfigError


class DemoSpec(BaseModel):
    """Options of the demo; options left as None take the chosen model's demo defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: str = Field("demo-out", description="Output directory (replaced if it holds an earlier demo).")
    model: Literal["unet", "maskrcnn"] = Field(
        "unet", description="unet: semantic demo; maskrcnn: instance demo (Mask R-CNN, ResNet-18 FPN).")
    n_images: int | None = Field(None, ge=20, le=100_000, description="Synthetic images in all (20 to 100,000).")
    size: int | None = Field(None, ge=32, le=2048, description="Image side length in pixels (32 to 2,048).")
    epochs: int | None = Field(None, gt=0)
    seed: int = 0
    execution: ExecutionSpec = ExecutionSpec()


def _demo_setup(spec: DemoSpec, train_store: str, checkpoint: str) -> dict[str, Any]:
    """The generator, sizes, mask kind and training spec of the chosen demo."""
    if spec.model == "unet":
        n, n_train, size = training.DEMO_N_IMAGES, training.DEMO_N_TRAIN, training.DEMO_IMAGE_SIZE
        train = dict(class_names=tuple(synthetic.CLASS_NAMES), arch_kwargs=dict(training.DEMO_ARCH_KWARGS),
                     epochs=training.DEMO_EPOCHS, batch_size=training.DEMO_BATCH_SIZE, lr=training.DEMO_LR,
                     time_budget_s=training.DEMO_TIME_BUDGET_S, normalisation=training.DEMO_NORMALISATION,
                     min_epoch_patches=0)  # the demo's epochs are calibrated to its 120-s budget: one pass each
        generate, mask_kind = synthetic.generate_collection, "class"
    else:
        ti = training_instance
        n, n_train, size = ti.DEMO_INSTANCE_N_IMAGES, ti.DEMO_INSTANCE_N_TRAIN, ti.DEMO_INSTANCE_IMAGE_SIZE
        train = dict(model=ti.DEMO_INSTANCE_ARCH, class_names=tuple(synthetic.INSTANCE_CLASS_NAMES),
                     arch_kwargs=dict(ti.DEMO_INSTANCE_ARCH_KWARGS), epochs=ti.DEMO_INSTANCE_EPOCHS,
                     batch_size=ti.DEMO_INSTANCE_BATCH_SIZE, lr=ti.DEMO_INSTANCE_LR,
                     time_budget_s=ti.DEMO_INSTANCE_TIME_BUDGET_S, normalisation=ti.DEMO_INSTANCE_NORMALISATION)
        generate, mask_kind = synthetic.generate_instance_collection, "instance"
    n_images = spec.n_images or n
    if spec.epochs:
        train["epochs"] = spec.epochs
    return {
        "generate": generate, "mask_kind": mask_kind, "n_images": n_images, "size": spec.size or size,
        "n_train": max(1, round(n_images * n_train / n)),
        "train": TrainSpec(store=train_store, out=checkpoint, seed=spec.seed, execution=spec.execution, **train),
    }


#: File that marks a directory as a demo's output, which the next demo with the same --out replaces.
DEMO_MARKER = ".segflow-demo"


def _split_collection(root: Path, ids: list[str], n_train: int) -> tuple[Path, Path]:
    """Move generated files into ``train/`` and ``heldout/`` folders (images/ and masks/ in each)."""
    parts = {"train": ids[:n_train], "heldout": ids[n_train:]}
    for part, members in parts.items():
        for kind in ("images", "masks"):
            (root / part / kind).mkdir(parents=True, exist_ok=True)
            for image_id in members:
                (root / kind / f"{image_id}.png").rename(root / part / kind / f"{image_id}.png")
    for kind in ("images", "masks"):
        (root / kind).rmdir()
    return root / "train", root / "heldout"


@flow(name="segflow-demo", flow_run_name=demo_run_name)
def demo_flow(spec: DemoSpec) -> dict[str, Any]:
    """Generate, train, segment the held-out images, and return the run summary."""
    log = get_run_logger()
    out = Path(spec.out)
    if out.exists() and any(out.iterdir()):
        # only ever delete what a demo wrote: its marker, or (demos before the marker) its collection and store
        if not ((out / DEMO_MARKER).is_file() or (out / "collection").is_dir() and (out / "train.zarr").is_dir()):
            raise ConfigError(f"{spec.out!r} exists and is not a segflow demo directory; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text(f"segflow demo directory: 'segflow demo --out {out}' replaces it whole\n")
    setup = _demo_setup(spec, str(out / "train.zarr"), str(out / f"{spec.model}-demo.safetensors"))
    ids = setup["generate"](out / "collection", n_images=setup["n_images"], size=setup["size"], seed=spec.seed)
    train_dir, heldout_dir = _split_collection(out / "collection", ids, setup["n_train"])
    log.info("demo (%s): %d synthetic images (%d to train on, %d held out) in %s", spec.model, len(ids),
             setup["n_train"], len(ids) - setup["n_train"], out / "collection")
    train = setup["train"]
    ingest_steps(IngestSpec(images=str(train_dir / "images"), masks=str(train_dir / "masks"), store=train.store,
                            mask_kind=setup["mask_kind"]))
    train_steps(train)
    store = str(out / "heldout.zarr")
    ingest_steps(IngestSpec(images=str(heldout_dir / "images"), masks=str(heldout_dir / "masks"), store=store,
                            mask_kind=setup["mask_kind"]))
    return segment_steps(SegmentSpec(store=store, checkpoint=train.out, out=str(out / "run"),
                                     execution=spec.execution))
