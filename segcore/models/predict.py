"""The prediction seam: every forward pass of a model over images goes through a :class:`Predictor`.

A predictor is one model ready for inference on one device: it owns normalisation of raw pixels,
device placement, autocast, channels-last and the per-process model cache. Semantic models give
:meth:`Predictor.logits` (and :meth:`Predictor.labels`, their batched argmax); instance models give
:meth:`Predictor.detect` (and :meth:`Predictor.instances`). Whole-image units, tiled blocks, TTA,
training validation and the benchmarks all call it, so another runtime (TorchScript, ONNX
Runtime, a model from another package) is another subclass and nothing else changes.

:func:`open_predictor` builds one from a model record (:mod:`segcore.models.record`), choosing the
subclass by the record's runtime: :class:`TorchPredictor`, or
:class:`~segcore.models.runtimes.TorchScriptPredictor` /
:class:`~segcore.models.runtimes.OnnxPredictor`; :func:`load_predictor` does so once per process
and device.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import threading
from functools import lru_cache

import numpy as np
import torch

from segcore.errors import ConfigError
from segcore.models.failures import forward_errors
from segcore.models.checkpoint import ModelMeta, load_checkpoint
from segcore.models.record import read_model_meta
from segcore.models.instances import InstancePrediction, predict_instances
from segcore.models.outputs import OutputRule, class_scores
from segcore.normalise import Stats, normalise_batch
from segcore.models.stream import stream_labels

log = logging.getLogger(__name__)

#: Autocast dtypes by precision name; ``fp32`` disables autocast.
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("bf16", "fp16", "fp32")
_ARGMAX = OutputRule()


def resolve_device(device: str, *, worker_index: int | None = None) -> str:
    """``auto`` -> ``cuda:<i>`` when CUDA is present (``i`` = worker index modulo GPUs), else ``cpu``."""
    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device.startswith("cuda:"):
        return device
    return f"cuda:{(worker_index or 0) % torch.cuda.device_count()}"


def check_device(device: str) -> str:
    """:func:`resolve_device` on this machine, checked as far as this machine can tell: raises
    :class:`ConfigError` when CUDA is asked for and torch sees none, or for a GPU index beyond those
    present. For runs whose workers share this machine, before any work starts (workers elsewhere
    have their own GPUs)."""
    resolved = resolve_device(device)
    if resolved.startswith("cuda:"):
        index, count = resolved.split(":", 1)[1], torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise ConfigError(f"device {device!r} asked for, but torch sees {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1}); use --device auto, cuda or one of those")
    return resolved


class Predictor(abc.ABC):
    """One model ready to predict on ``device``.

    Subclasses implement :meth:`logits` (semantic models) or :meth:`detect` (instance models);
    the batched helpers :meth:`labels` and :meth:`instances` are built on them. Inputs of
    :meth:`logits` and :meth:`detect` are normalised float32 ``(N, C, H, W)`` CPU tensors
    (:meth:`prepare`); raw images are ``(N, H, W, C)`` arrays of any numeric dtype. A volumetric
    semantic model (:attr:`spatial_dims` 3) takes ``(N, D, H, W, C)`` raw volumes and
    ``(N, C, D, H, W)`` tensors instead, and gives ``(N, K, D, H, W)`` logits.
    """

    def __init__(self, meta: ModelMeta, *, device: str = "cpu", precision: str = "bf16") -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.meta = meta
        self.device = device
        self.precision = precision

    @property
    def kind(self) -> str:
        """``semantic`` or ``instance``."""
        return self.meta.kind

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def spatial_dims(self) -> int:
        """2 for an image model, 3 for a volumetric one (the record's ``input_axes``)."""
        return self.meta.spatial_dims

    @property
    def label_dtype(self) -> np.dtype:
        """uint8 class labels, or uint16 for models with more than 256 classes."""
        return np.dtype(np.uint8 if self.num_classes <= 256 else np.uint16)

    @property
    def detections_cap(self) -> int | None:
        """Most detections an instance model keeps per input window (None: no cap, or semantic)."""
        return None

    def prepare(self, images: np.ndarray, *, stats: Stats | None = None) -> torch.Tensor:
        """Raw ``(N, H, W, C)`` images -> normalised float32 ``(N, C, H, W)`` (the model's normalisation;
        ``stats``: fixed per-channel percentile values, e.g. those of the large image a tile is from)."""
        return normalise_batch(images, self.meta.normalisation, stats=stats)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, K, H, W)`` class scores for a normalised batch (on :attr:`device`). Semantic models only."""
        raise ConfigError(f"model {self.meta.arch!r} is an instance model; it gives detections, not logits")

    def detect(self, x: torch.Tensor) -> list[InstancePrediction]:
        """One :class:`InstancePrediction` per image of a normalised batch. Instance models only."""
        raise ConfigError(f"model {self.meta.arch!r} is a semantic model; it gives logits, not detections")

    def stage(self, x: torch.Tensor) -> torch.Tensor:
        """A prepared batch (or any host tensor) moved to where :meth:`logits` runs it; the host
        tensor itself for runtimes that take host memory (the default)."""
        return x

    def labels(self, images: np.ndarray, *, batch_size: int | None = None, stats: Stats | None = None,
               tta: bool = False) -> np.ndarray:
        """``(N, H, W)`` class labels (argmax of :meth:`logits`) of raw ``(N, H, W, C)`` images,
        ``batch_size`` images per forward pass (default: all at once); ``tta``: of the logits
        averaged over the flips of the last two axes (:func:`segcore.tiling.flip_tta`, 4x the
        forward passes). A volumetric model gives ``(N, D, H, W)`` labels of ``(N, D, H, W, C)``
        volumes. Batches are pipelined (:mod:`segcore.models.stream`)."""
        if images.ndim != self.spatial_dims + 2:
            layout = "(N, D, H, W, C) volumes" if self.spatial_dims == 3 else "(N, H, W, C) images"
            raise ConfigError(f"model {self.meta.arch!r} takes {layout}, got an array of shape {images.shape}")
        return stream_labels(self, images, batch_size=batch_size, stats=stats, tta=tta).labels

    def instances(self, images: np.ndarray, *, batch_size: int | None = None, stats: Stats | None = None
                  ) -> list[InstancePrediction]:
        """One :class:`InstancePrediction` per raw ``(N, H, W, C)`` image, ``batch_size`` per pass."""
        step = batch_size or max(1, len(images))
        out: list[InstancePrediction] = []
        for s in range(0, len(images), step):
            out.extend(self.detect(self.prepare(images[s:s + step], stats=stats)))
        return out


def compiles(meta: ModelMeta) -> bool:
    """Whether ``torch.compile`` applies to the model of ``meta``: semantic models of the torch runtime."""
    return meta.runtime == "torch" and meta.kind == "semantic"


class TorchPredictor(Predictor):
    """A torch ``nn.Module`` (segflow's registry models): on CUDA with pinned, non-blocking copies,
    channels-last (channels-last-3d for a volumetric model) and autocast to ``precision`` (semantic
    models; detection post-processing is not autocast-safe, so instance models run fp32); on the
    CPU in fp32. The module's train/eval mode is the caller's (a checkpoint loaded by
    :func:`load_predictor` is in eval mode). On CUDA a semantic model's parameters are switched to
    channels-last in place (``Module.to`` converts them where they are), which changes no value:
    training that goes on with the module afterwards is unaffected.

    ``compile``: the forward pass goes through ``torch.compile`` (semantic models). Compiling happens
    on the first batch of each new shape (seconds to minutes; a warm-up the caller should exclude
    from per-image figures); if it fails, a warning says why and the model runs eagerly from then on.
    """

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, *, device: str = "cpu",
                 precision: str = "bf16", compile: bool = False) -> None:
        super().__init__(meta, device=device, precision=precision)
        self.model = model
        self._cuda = device.startswith("cuda")
        self._copy_stream: torch.cuda.Stream | None = None
        self._memory_format = torch.channels_last_3d if meta.spatial_dims == 3 else torch.channels_last
        if self._cuda and meta.kind == "semantic":
            self.model = model.to(memory_format=self._memory_format)
        self._compiled = torch.compile(self.model) if compile and compiles(meta) else None

    @property
    def detections_cap(self) -> int | None:
        detector = getattr(self.model, "detector", None)
        return int(detector.roi_heads.detections_per_img) if detector is not None else None

    def stage(self, x: torch.Tensor) -> torch.Tensor:
        """On CUDA: ``x`` copied to the device on a side stream (from pinned memory, without blocking
        the host), which the compute stream waits for; so the copy of the next batch overlaps the
        forward pass of the current one. On the CPU: ``x`` itself."""
        if not self._cuda or x.is_cuda:
            return x
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            y = (x if x.is_pinned() else x.pin_memory()).to(self.device, non_blocking=True)
        compute.wait_stream(self._copy_stream)
        y.record_stream(compute)  # the caching allocator must not reuse y's memory before compute is done
        return y

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "semantic":
            return super().logits(x)
        if not self._cuda:
            return self._scores(self._forward(x))
        x = self.stage(x).contiguous(memory_format=self._memory_format)
        amp = (torch.autocast("cuda", dtype=AUTOCAST[self.precision]) if self.precision in AUTOCAST
               else contextlib.nullcontext())
        with amp:
            return self._scores(self._forward(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            with forward_errors(x.shape):
                return self.model(x)
        try:
            return self._compiled(x)
        except (torch.cuda.OutOfMemoryError, MemoryError):  # the caller halves the batch (segcore.run.memory)
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager model computes the same
            log.warning("torch.compile of %s failed, running it eagerly: %s", self.meta.arch,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self._compiled = None
            with forward_errors(x.shape):
                return self.model(x)

    def _scores(self, out: torch.Tensor) -> torch.Tensor:
        """The model's output as class scores (:func:`~segcore.models.outputs.class_scores`); segflow's
        own models (one logit per class, argmax) pass through untouched."""
        return out if self.meta.output == _ARGMAX else class_scores(out, self.meta.output)

    def detect(self, x: torch.Tensor) -> list[InstancePrediction]:
        if self.kind != "instance":
            return super().detect(x)
        return predict_instances(self.model, self.stage(x))


def open_predictor(checkpoint: str | os.PathLike[str], *, device: str = "cpu", precision: str = "bf16",
                   compile: bool = False) -> Predictor:
    """The predictor of the model record ``checkpoint`` on ``device`` (uncached), by its runtime;
    ``compile``: through ``torch.compile`` (:class:`TorchPredictor`; ignored by other runtimes).

    Raises :class:`~segcore.errors.CheckpointError` when the record is malformed or its model does
    not load (weights that do not fit the architecture, an unreadable TorchScript or ONNX file).
    """
    meta = read_model_meta(checkpoint)
    if meta.runtime == "torch":
        model, meta = load_checkpoint(checkpoint, device=device)
        return TorchPredictor(model, meta, device=device, precision=precision, compile=compile)
    from segcore.models.runtimes import OnnxPredictor, TorchScriptPredictor

    cls = TorchScriptPredictor if meta.runtime == "torchscript" else OnnxPredictor
    return cls.from_record(checkpoint, meta, device=device, precision=precision)


_cache_lock = threading.Lock()


@lru_cache(maxsize=4)
def _cached(checkpoint: str, sha256: str, device: str, precision: str, compile: bool) -> Predictor:
    log.info("loading %s on %s", checkpoint, device)
    if device.startswith("cuda"):  # runs segment images of one shape per group: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    return open_predictor(checkpoint, device=device, precision=precision, compile=compile)


def load_predictor(checkpoint: str, *, sha256: str, device: str = "cpu", precision: str = "bf16",
                   compile: bool = False) -> Predictor:
    """The predictor of the model record ``checkpoint`` on ``device``, built once per process (keyed
    by the content hash, :func:`segcore.models.record.model_sha256`, so a record replaced in place is
    loaded again)."""
    with _cache_lock:
        return _cached(str(checkpoint), sha256, device, precision, compile)


__all__ = ["AUTOCAST", "PRECISIONS", "Predictor", "check_device", "compiles", "TorchPredictor", "load_predictor",
           "open_predictor", "resolve_device"]
