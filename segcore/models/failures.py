"""Telling a model's own failures apart: the model cannot take its input, or fails inside.

Every forward pass of a :class:`~segcore.models.predict.Predictor` (and the detector call of
:func:`~segcore.models.instances.predict_instances`) runs inside :func:`forward_errors`: an error
that another attempt would raise again becomes a :class:`~segcore.errors.ModelError`, which a run
does not retry; out of memory (torch's CPU allocator's too, raised as :class:`MemoryError` so that
the batch is halved), CUDA device faults and read errors stay as they are.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

from segcore.errors import ModelError, SegflowError, error_line

_NAMED = re.compile(r"^\w+(Error|Exception): ")  # a message that names its error (a TorchScript model's)
#: How errors that may pass on another attempt begin: a CUDA device fault, a runtime out of memory.
_TRANSIENT = ("CUDA error", "CUDA driver error", "cuDNN error", "CUBLAS_STATUS", "NCCL")
#: Words of an out-of-memory error raised as another type (ONNX Runtime's, torch's CPU allocator's).
_OUT_OF_MEMORY = ("out of memory", "failed to allocate", "can't allocate memory")
#: How torch's CPU allocator says it is out of memory (in a RuntimeError).
_CPU_ALLOCATOR = "DefaultCPUAllocator: can't allocate memory"
#: A CUDA device fault (torch >= 2.8; none before).
_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", ())


def model_failure(exc: BaseException, shape: tuple[int, ...]) -> ModelError | None:
    """``exc``, raised by a model's forward pass over a batch of ``shape``, as a
    :class:`~segcore.errors.ModelError` (which a run does not retry: every attempt would fail the
    same way): the model cannot take that input, or fails inside. None for what may pass on another
    attempt or is segflow's own error already: out of memory, a CUDA device fault, a read error."""
    if isinstance(exc, (SegflowError, OSError, MemoryError, torch.cuda.OutOfMemoryError, _ACCELERATOR_ERROR)):
        return None
    text = error_line(exc)
    if text.startswith(_TRANSIENT) or any(m in text.lower() for m in _OUT_OF_MEMORY):
        return None
    named = text if _NAMED.match(text) else f"{type(exc).__name__}: {text or 'no message'}"
    return ModelError(f"the model failed on a batch of shape {tuple(shape)} ({named}); check that it takes images "
                      "of that size and channels (an imported model may need --input-multiple)")


@contextlib.contextmanager
def forward_errors(shape: tuple[int, ...]) -> Iterator[None]:
    """Raise what a model's forward pass over a batch of ``shape`` raises inside the block as
    :func:`model_failure` says: a :class:`~segcore.errors.ModelError`, or as it is; torch's CPU
    allocator running out of memory as a :class:`MemoryError` (the run halves the batch)."""
    try:
        yield
    except Exception as exc:
        if _CPU_ALLOCATOR in str(exc):  # torch's CPU out of memory is a RuntimeError: halve the batch as for CUDA's
            raise MemoryError(error_line(exc)) from exc
        failure = model_failure(exc, tuple(shape))
        if failure is None:
            raise
        raise failure from exc


__all__ = ["forward_errors", "model_failure"]
