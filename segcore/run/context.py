"""What every unit of a run needs (:class:`RunContext`), and the typed records units return.

A :class:`RunContext` is built once per run by the flow (after :func:`segcore.run.rundir.prepare_run`)
and shipped to every worker with the unit to do: paths, the run's identity (``run_id`` and
``key``, see :func:`run_key`), the checkpoint, the store's kind of ground truth, execution
settings and the tiling of large images. It is small, frozen and picklable.

Units and blocks return records (frozen dataclasses), never arrays; the record of a unit, a
block, a block's detections or a finished tiled image is also its *done-record*
(:func:`segcore.run.rundir.mark_done`), written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from segcore.models.predict import Predictor, load_predictor, resolve_device
from segcore.run.memory import Faults


@dataclass(frozen=True)
class Tiling:
    """Resolved tiling of large images (see :func:`segcore.run.plan.resolve_tiling`)."""

    tile: int
    overlap: int
    blend: str = "gaussian"
    tta: bool = False


def run_key(*, store_id: str | None, checkpoint_sha256: str, shaping: Mapping[str, Any]) -> str:
    """16 hex digits naming what a run's outputs depend on: the store's identity, the checkpoint's
    content and the output-shaping parameters (``shaping``, a JSON-able mapping)."""
    blob = json.dumps({"store_id": store_id, "checkpoint_sha256": checkpoint_sha256, "shaping": dict(shaping)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunContext:
    """Everything a unit of one run needs, besides the unit itself.

    ``device`` is the requested device (``auto``, ``cpu``, ``cuda``, ``cuda:N``); a worker resolves
    it with :meth:`on_worker`. ``key`` is the run key every done-record carries (:func:`run_key`).
    """

    store: str
    run_dir: str
    run_id: str
    key: str
    checkpoint: str
    checkpoint_sha256: str
    mask_kind: str = "class"
    tta: bool = False
    batch_size: int = 8
    device: str = "cpu"
    precision: str = "bf16"
    num_threads: int | None = None
    tiling: Tiling | None = None
    faults: Faults = Faults()
    compile: bool = False

    def on_worker(self, worker_index: int | None = None) -> "RunContext":
        """This context with ``device`` resolved for the worker running it (one GPU per worker)."""
        return dataclasses.replace(self, device=resolve_device(self.device, worker_index=worker_index))

    def predictor(self) -> Predictor:
        """The run's model on this worker's device, loaded once per process; sets torch's threads."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        return load_predictor(self.checkpoint, sha256=self.checkpoint_sha256, device=self.device,
                              precision=self.precision, compile=self.compile)


class Record:
    """Base of the done-records: JSON round trip and the marker's name."""

    kind: ClassVar[str] = "record"

    @property
    def marker(self) -> str:
        """File name stem of the done-record below ``RUN_DIR/units/``."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "Record":
        data = dict(data)
        cls = RECORD_TYPES[data.pop("type")]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _tuples(v) if k in ("window",) else v for k, v in data.items() if k in names})


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Timing:
    """Where and when a unit ran (seconds are wall-clock, ``started``/``finished`` Unix times)."""

    device: str
    pid: int
    started: float
    finished: float
    read_s: float = 0.0
    predict_s: float = 0.0
    total_s: float = 0.0

    @staticmethod
    def since(t0: float, started: float, device: str, *, read_s: float = 0.0, predict_s: float = 0.0) -> "Timing":
        return Timing(device=device, pid=os.getpid(), started=started, finished=time.time(),
                      read_s=round(read_s, 4), predict_s=round(predict_s, 4),
                      total_s=round(time.perf_counter() - t0, 4))


@dataclass(frozen=True)
class Counts:
    """Per-class pixel counts of one block against its ground truth, or why it could not be scored."""

    tp: tuple[int, ...] = ()
    fp: tuple[int, ...] = ()
    fn: tuple[int, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class UnitRecord(Record):
    """A unit of whole images: ``[start, stop)`` of store group ``group``; ``batch_size``: images per forward
    pass it finished with (see :mod:`segcore.run.memory`; None in older records); ``n_refused``: its
    images given a blank mask without a forward pass (refused at ingest or by the channel policy; 0
    in older records); ``n_superseded``: its image versions that newer content replaced before the
    unit ran, given a blank mask and no rows without a forward pass (0 in older records); ``n_capped``:
    its images whose detections reached the instance model's cap, so that objects may be missing (0
    in older records)."""

    kind: ClassVar[str] = "unit"
    unit: str
    group: str
    start: int
    stop: int
    key: str
    n_images: int
    n_evaluated: int
    n_errors: int
    dice_rows: int
    instances: int | None
    timing: Timing
    batch_size: int | None = None
    n_refused: int = 0
    n_superseded: int = 0
    n_capped: int = 0

    @property
    def marker(self) -> str:
        return self.unit


@dataclass(frozen=True)
class BlockRecord(Record):
    """One block (``window`` = ``(y0, y1, x0, x1)``) of image ``index`` of a tiled group.

    ``counts`` is None without usable ground truth. Instance models add ``objects`` (the pixels
    each object owns in the block: ``[id, area, y0, x0, y1, x1]`` in image coordinates) and the
    seam figures of the block's own detections. ``batch_size`` and ``tile`` are the tiles per forward
    pass and the tile side the block was segmented with (smaller than the run's after an
    out-of-memory back-off, :mod:`segcore.run.memory`; None for pasted blocks and older records).
    """

    kind: ClassVar[str] = "block"
    unit: str
    group: str
    index: int
    window: tuple[int, int, int, int]
    key: str
    tiles: int
    counts: Counts | None
    timing: Timing
    objects: list[list[int]] = field(default_factory=list)
    detected: int = 0
    on_seams: int = 0
    duplicates_dropped: int = 0
    cut_risk: int = 0
    capped: int = 0
    batch_size: int | None = None
    tile: int | None = None

    @property
    def marker(self) -> str:
        return self.unit

    @property
    def pixels(self) -> int:
        y0, y1, x0, x1 = self.window
        return (y1 - y0) * (x1 - x0)

    @staticmethod
    def from_json_counts(data: Mapping[str, Any] | None) -> Counts | None:
        return None if data is None else Counts(**{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in data.items()})


@dataclass(frozen=True)
class DetectRecord(Record):
    """Instance models, first pass over a block: how many objects it kept (saved in ``blocks/``), and the
    detector core it ran on (``tile``; None in older records)."""

    kind: ClassVar[str] = "detect"
    unit: str
    key: str
    objects: int
    windows: int
    capped: int
    seconds: float
    tile: int | None = None

    @property
    def marker(self) -> str:
        return f"{self.unit}.detect"


@dataclass(frozen=True)
class ImageRecord(Record):
    """A tiled image whose tables (Dice, instances, seams, metrics) are written (part ``part``);
    ``superseded``: a version that newer content replaced, left out without a forward pass or rows."""

    kind: ClassVar[str] = "image"
    part: str
    group: str
    index: int
    key: str
    image_id: str
    blocks: int
    dice_rows: int
    instances: int | None = None
    superseded: bool = False

    @property
    def marker(self) -> str:
        return f"image-{self.part}"


RECORD_TYPES: dict[str, type[Record]] = {c.kind: c for c in (UnitRecord, BlockRecord, DetectRecord, ImageRecord)}


def record_from_json(data: Mapping[str, Any]) -> Record:
    """The record a done-marker holds (nested timing and counts parsed too)."""
    data = dict(data)
    if isinstance(data.get("timing"), dict):
        data["timing"] = Timing(**data["timing"])
    if data.get("type") == "block":
        data["counts"] = BlockRecord.from_json_counts(data.get("counts"))
    return Record.from_json(data)
