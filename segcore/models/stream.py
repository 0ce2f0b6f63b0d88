"""The pipelined batch loop behind :meth:`Predictor.labels`: read ahead, forward, label and count behind.

A semantic model's images go through three stages, batch by batch:

1. **prepare**: batch *k+1* is normalised (:meth:`Predictor.prepare`) and, on CUDA, copied into
   pinned host memory, together with its ground truth, while batch *k* runs;
2. **forward**: :meth:`Predictor.stage` puts the batch on the device (on CUDA: a non-blocking copy
   on a side stream), :meth:`Predictor.logits` runs the model, and the argmax and, for images with
   ground truth, the confusion matrix (``[image, gt class, predicted class]`` pixel counts) are
   computed where the logits are, so that only the labels and a few integers leave the device (a
   model whose output rule keeps each image's largest foreground region has its labels go through
   that on the host first, :func:`segcore.models.outputs.keep_largest_region`);
3. **collect**: the labels and counts of batch *k-1* are copied back (on CUDA asynchronously, into
   pinned buffers) and stored while batch *k* is still running on the device.

On CUDA, stage 1 runs in a reader thread with at most ``read_ahead`` batches waiting (default
:data:`CUDA_READ_AHEAD`), so host memory holds a fixed number of batches in flight whatever the
number of images. On the CPU the forward pass already uses every core: a reader thread would
compete with it (its torch operations start a thread team of their own), so the stages run one
after the other (``read_ahead=0``) unless asked otherwise; the results are the same either way.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from segcore.models.outputs import keep_largest_region
from segcore.normalise import Stats
from segcore.tiling import flip_tta

if TYPE_CHECKING:
    from segcore.models.predict import Predictor

#: Batches prepared ahead of the forward pass on CUDA.
CUDA_READ_AHEAD = 2


@dataclass(frozen=True)
class Labelled:
    """Labels of N images and, when ground truth was given, their confusion matrices.

    ``labels``: ``(N, *spatial)`` class labels (the predictor's :attr:`~Predictor.label_dtype`);
    ``confusion``: ``(N, K, K)`` int64 pixel counts ``[image, gt class, predicted class]``, zero for
    images that were not scored, or None when no ground truth was given.
    """

    labels: np.ndarray
    confusion: np.ndarray | None = None


def confusion_matrices(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(n, K, K)`` int64 ``[image, gt, pred]`` counts of ``(n, ...)`` integer labels in ``[0, K)``,
    on the labels' device: one bincount over the batch, of int32 codes (4 bytes per pixel) built in
    place, int64 when ``n * K * K`` does not fit in int32."""
    n, k = pred.shape[0], int(num_classes)
    dtype = torch.int32 if n * k * k < 2 ** 31 else torch.int64
    codes = gt.to(dtype, copy=True).mul_(k)
    codes += pred
    codes += (torch.arange(n, device=pred.device, dtype=dtype) * (k * k)).view(-1, *([1] * (pred.dim() - 1)))
    return torch.bincount(codes.reshape(-1), minlength=n * k * k).reshape(n, k, k)


@dataclass
class _Batch:
    start: int
    stop: int
    x: torch.Tensor
    gt: torch.Tensor | None  # (m, ...) ground truth of the scored images of the batch
    scored: np.ndarray       # indices within the batch of the scored images


def _batches(predictor: Predictor, images: np.ndarray, gt: np.ndarray | None, scored: np.ndarray, step: int,
             stats: Stats | None, pin: bool) -> Iterator[_Batch]:
    for s in range(0, len(images), step):
        e = min(s + step, len(images))
        x = predictor.prepare(images[s:e], stats=stats)
        idx = np.flatnonzero(scored[s:e]) if gt is not None else np.empty(0, np.int64)
        g = None
        if len(idx):  # the batch's ground truth itself (a view) when every image is scored, else a copy
            g = torch.from_numpy(np.ascontiguousarray(gt[s:e] if len(idx) == e - s else gt[s:e][idx]))
        if pin:
            x = x.pin_memory()
            g = g.pin_memory() if g is not None else None
        yield _Batch(s, e, x, g, idx)


class _ReadAhead:
    """Batches from a generator, produced in a thread with at most ``depth`` waiting."""

    _DONE = object()

    def __init__(self, batches: Iterator[_Batch], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(batches,), name="segflow-read-ahead", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, batches: Iterator[_Batch]) -> None:
        try:
            for b in batches:
                if not self._put(b):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, which raises it
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Pending:
    batch: _Batch
    labels: torch.Tensor
    confusion: torch.Tensor | None
    done: torch.cuda.Event | None


def stream_labels(predictor: Predictor, images: np.ndarray, *, batch_size: int | None = None,
                  stats: Stats | None = None, tta: bool = False, gt: np.ndarray | None = None,
                  scored: np.ndarray | None = None, read_ahead: int | None = None) -> Labelled:
    """Labels (and confusion matrices) of raw images through ``predictor``, pipelined as the module says.

    Args:
        images: ``(N, H, W, C)`` raw images (``(N, D, H, W, C)`` volumes for a volumetric model).
        batch_size: images per forward pass (default: all at once).
        stats: fixed percentile values (:meth:`Predictor.prepare`).
        tta: logits averaged over the flips of the spatial axes (:func:`segcore.tiling.flip_tta`).
        gt: ``(N, *spatial)`` ground-truth class labels, each in ``[0, K)`` for the scored images.
        scored: ``(N,)`` bool, the images to score against ``gt`` (default: all when ``gt`` is given).
        read_ahead: batches prepared ahead in a reader thread (0: none); default
            :data:`CUDA_READ_AHEAD` on CUDA, 0 on the CPU.
    """
    n = len(images)
    step = batch_size or max(1, n)
    cuda = str(predictor.device).startswith("cuda")
    depth = (CUDA_READ_AHEAD if cuda else 0) if read_ahead is None else int(read_ahead)
    if gt is not None and scored is None:
        scored = np.ones(n, dtype=bool)
    scored = np.zeros(n, dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    k = predictor.num_classes
    wide = predictor.label_dtype != np.uint8
    out = np.empty(images.shape[:-1], dtype=predictor.label_dtype)
    confusion = np.zeros((n, k, k), dtype=np.int64) if gt is not None else None
    logits_of = flip_tta(predictor.logits) if tta else predictor.logits
    largest = predictor.meta.output.largest_region and predictor.spatial_dims == 2
    source = _batches(predictor, images, gt, scored, step, stats, pin=cuda)
    reader = _ReadAhead(source, depth) if depth > 0 else None
    pending: _Pending | None = None

    def collect(p: _Pending) -> None:
        if p.done is not None:
            p.done.synchronize()
        out[p.batch.start:p.batch.stop] = p.labels.numpy()
        if p.confusion is not None:
            confusion[p.batch.start + p.batch.scored] = p.confusion.numpy()

    try:
        with torch.inference_mode():
            for batch in (reader if reader is not None else source):
                logits = logits_of(predictor.stage(batch.x))
                labels = logits.argmax(dim=1).to(torch.int32 if wide else torch.uint8)
                if largest:  # on the host (a connected-component pass), then back where the logits are
                    labels = torch.from_numpy(keep_largest_region(labels.cpu().numpy())).to(labels.device)
                cm = None
                if batch.gt is not None:
                    every = len(batch.scored) == len(labels)
                    cm = confusion_matrices(labels if every else labels[torch.as_tensor(batch.scored,
                                                                                        device=labels.device)],
                                            predictor.stage(batch.gt), k)
                done = None
                if labels.is_cuda:  # both copies queued behind this batch's forward pass; collected next turn
                    labels = labels.to("cpu", non_blocking=True)
                    cm = cm.to("cpu", non_blocking=True) if cm is not None else None
                    done = torch.cuda.Event()
                    done.record()
                if pending is not None:
                    collect(pending)
                pending = _Pending(batch, labels, cm, done)
            if pending is not None:
                collect(pending)
    finally:
        if reader is not None:
            reader.close()
    return Labelled(out, confusion)


__all__ = ["CUDA_READ_AHEAD", "Labelled", "confusion_matrices", "stream_labels"]
