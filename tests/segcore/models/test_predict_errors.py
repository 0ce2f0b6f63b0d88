"""A model that fails on its input fails once, as a ModelError naming the batch's shape and the
model's own error (a run does not retry it); what may pass on another attempt is raised as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.errors import NOT_RETRIED, ConfigError, ImageReadError, ModelError, error_line
from segcore.models.checkpoint import ModelMeta
from segcore.models.failures import forward_errors, model_failure
from segcore.models.predict import TorchPredictor
from segcore.normalise import Normalisation


class CappedSize(torch.nn.Module):
    """Takes images up to 64 x 64 px only (a learned per-pixel bias of that size)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        self.bias = torch.nn.Parameter(torch.zeros(1, 2, 64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias[:, :, :x.shape[-2], :x.shape[-1]]


META = ModelMeta(arch="unet", class_names=("bg", "fg"), in_channels=1, normalisation=Normalisation(mode="range"))


def test_a_model_that_cannot_take_the_images_fails_as_a_model_error_naming_the_batch() -> None:
    predictor = TorchPredictor(CappedSize().eval(), META, precision="fp32")
    assert predictor.labels(np.zeros((2, 32, 32, 1), np.uint8)).shape == (2, 32, 32)
    with pytest.raises(ModelError, match=r"^the model failed on a batch of shape \(2, 1, 80, 80\) \(RuntimeError: "
                                         r"The size of tensor a \(80\) must match .*; check that it takes") as info:
        predictor.labels(np.zeros((2, 80, 80, 1), np.uint8))
    assert isinstance(info.value, NOT_RETRIED) and isinstance(info.value.__cause__, RuntimeError)


def test_what_may_pass_on_another_attempt_is_not_a_model_error() -> None:
    for exc in (OSError("connection reset"), ImageReadError("bad chunk"), ConfigError("bad option"), MemoryError(),
                torch.cuda.OutOfMemoryError("CUDA out of memory"),
                RuntimeError("CUDA error: an illegal memory access was encountered"),
                RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory")):
        assert model_failure(exc, (1, 1, 8, 8)) is None, exc
    assert "(ValueError: no message)" in str(model_failure(ValueError(), (1, 1, 8, 8)))
    assert not isinstance(ImageReadError("x"), NOT_RETRIED)
    # torch's CPU allocator out of memory (a RuntimeError): a MemoryError, so that the run halves the batch
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                       "tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
    assert model_failure(cpu, (1, 1, 8, 8)) is None
    with pytest.raises(MemoryError, match="DefaultCPUAllocator") as info:
        with forward_errors((1, 1, 8, 8)):
            raise cpu
    assert info.value.__cause__ is cpu


def test_the_error_line_of_a_torchscript_model_is_the_error_it_ends_with() -> None:
    script = RuntimeError("The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript "
                          "(most recent call last):\n  File \"m.py\", line 3, in forward\n    return x + b\n"
                          "RuntimeError: The size of tensor a (80) must match the size of tensor b (64)\n")
    assert error_line(script) == "RuntimeError: The size of tensor a (80) must match the size of tensor b (64)"
    assert "shape (1, 1, 80, 80) (RuntimeError: The size of tensor a (80) must" in str(model_failure(script,
                                                                                                     (1, 1, 80, 80)))
    assert error_line(ValueError("two\n  lines")) == "two lines"
    assert error_line(ValueError("x" * 400), 10) == "x" * 10
