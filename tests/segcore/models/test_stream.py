"""The pipelined batch loop (segcore.models.stream): same labels and counts as a plain loop, with or
without a reader thread; bounded batches in flight; errors of either side reach the caller."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from segcore.metrics.dice import confusion_counts
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta
from segcore.models.predict import TorchPredictor
from segcore.models.stream import confusion_matrices, stream_labels
from segcore.normalise import Normalisation


def _predictor(classes: int = 3) -> TorchPredictor:
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=classes, base=4, depth=2).eval()
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2},
                     class_names=tuple(f"c{i}" for i in range(classes)), in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    return TorchPredictor(model, meta, device="cpu")


def _images(n: int = 11) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, (n, 24, 20, 1), dtype=np.uint8)


def test_confusion_matrices_by_hand():
    pred = torch.tensor([[[0, 1], [1, 2]], [[2, 2], [0, 0]]])
    gt = torch.tensor([[[0, 1], [2, 2]], [[2, 0], [0, 1]]])
    cm = confusion_matrices(pred, gt, 3).numpy()
    assert cm.shape == (2, 3, 3) and cm.dtype == np.int64
    assert cm[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # [gt, pred]
    assert cm[1].tolist() == [[1, 0, 1], [1, 0, 0], [0, 0, 1]]


@pytest.mark.parametrize("read_ahead", [0, 1, 3])
@pytest.mark.parametrize("batch", [1, 4, None])
def test_labels_and_counts_equal_a_plain_loop(read_ahead, batch):
    p, images = _predictor(), _images()
    with torch.inference_mode():
        want = p.logits(p.prepare(images)).argmax(1).numpy().astype(np.uint8)
    gt = np.random.default_rng(2).integers(0, 3, images.shape[:3]).astype(np.uint8)
    scored = np.arange(len(images)) % 3 != 1
    got = stream_labels(p, images, batch_size=batch, gt=gt, scored=scored, read_ahead=read_ahead)
    assert got.labels.dtype == np.uint8 and np.array_equal(got.labels, want)
    tp, fp, fn = confusion_counts(want[scored], gt[scored], 3)
    cm = got.confusion[scored]
    assert np.array_equal(np.diagonal(cm, axis1=1, axis2=2), tp)
    assert np.array_equal(cm.sum(axis=1) - tp, fp) and np.array_equal(cm.sum(axis=2) - tp, fn)
    assert not got.confusion[~scored].any()  # images not scored have no counts
    assert stream_labels(p, images, batch_size=batch, read_ahead=read_ahead).confusion is None


def test_tta_and_many_classes():
    p, images = _predictor(classes=300), _images(3)
    with torch.inference_mode():
        x = p.prepare(images)
        logits = sum(p.logits(x.flip(d) if d else x).flip(d) if d else p.logits(x)
                     for d in (None, (-1,), (-2,), (-2, -1)))
    got = stream_labels(p, images, batch_size=2, tta=True, read_ahead=2).labels
    assert got.dtype == np.uint16 and np.array_equal(got, logits.argmax(1).numpy())


class _Counting(TorchPredictor):
    """Counts batches prepared but not yet through the model."""

    def __init__(self, base: TorchPredictor, *, fail_prepare_at: int | None = None,
                 fail_forward_at: int | None = None) -> None:
        super().__init__(base.model, base.meta)
        self.lock = threading.Lock()
        self.prepared = self.forwarded = self.most_in_flight = 0
        self.fail_prepare_at, self.fail_forward_at = fail_prepare_at, fail_forward_at

    def prepare(self, images, *, stats=None):
        with self.lock:
            if self.prepared == self.fail_prepare_at:
                raise ValueError("unreadable batch")
            self.prepared += 1
            self.most_in_flight = max(self.most_in_flight, self.prepared - self.forwarded)
        return super().prepare(images, stats=stats)

    def logits(self, x):
        with self.lock:
            if self.forwarded == self.fail_forward_at:
                raise RuntimeError("out of memory")
            self.forwarded += 1
        return super().logits(x)


@pytest.mark.parametrize("read_ahead", [1, 2])
def test_batches_in_flight_are_bounded_whatever_the_number_of_images(read_ahead):
    p = _Counting(_predictor())
    stream_labels(p, _images(40), batch_size=2, read_ahead=read_ahead)
    assert p.prepared == p.forwarded == 20
    # waiting in the queue, plus the one the reader holds, plus the one being run
    assert p.most_in_flight <= read_ahead + 2


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_errors_of_the_reader_and_of_the_forward_pass_reach_the_caller(read_ahead):
    before = threading.active_count()
    with pytest.raises(ValueError, match="unreadable batch"):
        stream_labels(_Counting(_predictor(), fail_prepare_at=3), _images(20), batch_size=2, read_ahead=read_ahead)
    with pytest.raises(RuntimeError, match="out of memory"):
        stream_labels(_Counting(_predictor(), fail_forward_at=2), _images(20), batch_size=2, read_ahead=read_ahead)
    assert threading.active_count() == before  # the reader thread has ended


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_counts_on_the_device_and_agrees_with_the_cpu():
    cpu = _predictor()
    images = _images(13)
    gt = np.random.default_rng(3).integers(0, 3, images.shape[:3]).astype(np.uint8)
    want = stream_labels(cpu, images, batch_size=4, gt=gt)
    gpu = TorchPredictor(cpu.model.to("cuda"), cpu.meta, device="cuda", precision="fp32")
    got = stream_labels(gpu, images, batch_size=4, gt=gt)  # reader thread, side-stream copies, async results
    assert (got.labels == want.labels).mean() >= 0.999
    agree = got.labels == want.labels
    if agree.all():
        assert np.array_equal(got.confusion, want.confusion)


def test_a_model_that_fails_to_compile_runs_eagerly_with_a_warning(monkeypatch, caplog):
    base = _predictor()

    def broken_compile(model, **_):
        def run(x):
            raise RuntimeError("inductor: no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled = TorchPredictor(base.model, base.meta, device="cpu", compile=True)
    images = _images(4)
    with caplog.at_level("WARNING", logger="segcore.models.predict"):
        got = compiled.labels(images, batch_size=2)
    assert np.array_equal(got, base.labels(images, batch_size=2))
    assert "running it eagerly: inductor: no C++ compiler found" in caplog.text
    assert compiled._compiled is None  # compiled once, failed once: eager from then on
    assert caplog.text.count("failed") == 1


def test_out_of_memory_in_a_compiled_model_is_not_taken_for_a_compiler_failure(monkeypatch):
    def oom_compile(model, **_):
        def run(x):
            raise MemoryError("no memory")
        return run

    monkeypatch.setattr(torch, "compile", oom_compile)
    base = _predictor()
    with pytest.raises(MemoryError):
        TorchPredictor(base.model, base.meta, device="cpu", compile=True).labels(_images(2))


@pytest.mark.slow
def test_torch_compile_gives_the_eager_labels():
    base = _predictor()
    images = _images(4)
    compiled = TorchPredictor(base.model, base.meta, device="cpu", compile=True)
    got = compiled.labels(images, batch_size=2)
    assert compiled._compiled is not None  # it really compiled
    assert (got == base.labels(images, batch_size=2)).mean() >= 0.999
