"""The embedded demo: a synthetic collection with exact ground truth, a UNet trained on part of
it by segflow itself, and the full pipeline (ingest -> segment -> Dice) on the held-out part."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.pipeline import ingest_steps, segment_steps
from flows.train import train_steps
from segcore import synthetic, training
from segcore.config import ExecutionSpec, IngestSpec, SegmentSpec, TrainSpec
from segcore.errors import ConfigError


class DemoSpec(BaseModel):
    """Options of the demo; defaults are what ``make demo`` runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: str = Field("demo-out", description="Output directory (replaced if it holds an earlier demo).")
    n_images: int = Field(training.DEMO_N_IMAGES, ge=20, description="Synthetic images in all.")
    train_fraction: float = Field(training.DEMO_N_TRAIN / training.DEMO_N_IMAGES, gt=0, lt=1)
    size: int = Field(training.DEMO_IMAGE_SIZE, ge=32, description="Image side length in pixels.")
    epochs: int = Field(training.DEMO_EPOCHS, gt=0)
    seed: int = 0
    execution: ExecutionSpec = ExecutionSpec()


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


@flow(name="segflow-demo")
def demo_flow(spec: DemoSpec) -> dict[str, Any]:
    """Generate, train, segment the held-out images, and return the run summary."""
    log = get_run_logger()
    out = Path(spec.out)
    if out.exists() and any(out.iterdir()):
        if not (out / "collection").exists():
            raise ConfigError(f"{spec.out!r} exists and is not a segflow demo directory; choose another --out")
        shutil.rmtree(out)
    ids = synthetic.generate_collection(out / "collection", n_images=spec.n_images, size=spec.size, seed=spec.seed)
    n_train = max(1, int(round(spec.n_images * spec.train_fraction)))
    train_dir, heldout_dir = _split_collection(out / "collection", ids, n_train)
    log.info("demo: %d synthetic images (%d to train on, %d held out) in %s", len(ids), n_train,
             len(ids) - n_train, out / "collection")

    train_store = str(out / "train.zarr")
    ingest_steps(IngestSpec(images=str(train_dir / "images"), masks=str(train_dir / "masks"), store=train_store))
    checkpoint = str(out / "unet-demo.safetensors")
    train_steps(TrainSpec(
        store=train_store, out=checkpoint, class_names=tuple(synthetic.CLASS_NAMES),
        base=training.DEMO_ARCH_KWARGS["base"], depth=training.DEMO_ARCH_KWARGS["depth"], epochs=spec.epochs,
        batch_size=training.DEMO_BATCH_SIZE, lr=training.DEMO_LR, seed=spec.seed,
        time_budget_s=training.DEMO_TIME_BUDGET_S, normalisation=training.DEMO_NORMALISATION,
        execution=spec.execution,
    ))
    store = str(out / "heldout.zarr")
    ingest_steps(IngestSpec(images=str(heldout_dir / "images"), masks=str(heldout_dir / "masks"), store=store))
    return segment_steps(SegmentSpec(store=store, checkpoint=checkpoint, out=str(out / "run"),
                                     execution=spec.execution))
