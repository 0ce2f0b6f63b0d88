"""Predictors of exported and imported models: TorchScript and ONNX Runtime.

Both are :class:`~segcore.models.predict.Predictor` subclasses for semantic models, built from a
directory record (:mod:`segcore.models.record`) by :func:`segcore.models.predict.open_predictor`.
Their graphs take ``(N, C, H, W)`` float32 batches whose ``H`` and ``W`` are multiples of
``meta.input_multiple`` (volumetric records, ``input_axes`` ``bczyx``: ``(N, C, D, H, W)``, with
``D`` too): inputs are padded with :func:`segcore.models.padding.pad_to_multiple` (the rule
segflow's own networks apply inside ``forward``) and the logits are cropped back.

- TorchScript (``torch.jit.load``): on CUDA, autocast to ``precision`` as :class:`TorchPredictor`
  does; fp32 on the CPU.
- ONNX Runtime: the CUDA execution provider when ``device`` is CUDA and onnxruntime offers it,
  else the CPU provider; always fp32; dynamic ``N`` and spatial axes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Any

import torch

from segcore import fsio
from segcore.errors import CheckpointError, ConfigError, error_line
from segcore.models.checkpoint import ModelMeta
from segcore.models.outputs import class_scores
from segcore.models.padding import crop_to, pad_to_multiple
from segcore.models.failures import forward_errors
from segcore.models.predict import AUTOCAST, Predictor
from segcore.models.record import MODEL_FILES

log = logging.getLogger(__name__)


def _semantic_only(meta: ModelMeta) -> None:
    if meta.kind != "semantic":
        raise CheckpointError(f"{meta.runtime} models are semantic models in this segflow, but the record names "
                              f"{meta.kind} architecture {meta.arch!r}; run it as a torch checkpoint")


class TorchScriptPredictor(Predictor):
    """A TorchScript module giving ``(N, K, H, W)`` logits of a normalised ``(N, C, H, W)`` batch."""

    def __init__(self, module: torch.jit.ScriptModule, meta: ModelMeta, *, device: str = "cpu",
                 precision: str = "bf16") -> None:
        super().__init__(meta, device=device, precision=precision)
        _semantic_only(meta)
        self.module = module
        self._cuda = device.startswith("cuda")

    @classmethod
    def from_record(cls, path: str | os.PathLike[str], meta: ModelMeta, *, device: str = "cpu",
                    precision: str = "bf16") -> "TorchScriptPredictor":
        return cls(load_torchscript(fsio.join(path, MODEL_FILES["torchscript"]), device=device), meta, device=device,
                   precision=precision)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        padded, sizes = pad_to_multiple(x, self.meta.input_multiple, spatial_dims=self.spatial_dims)
        amp = (torch.autocast("cuda", dtype=AUTOCAST[self.precision]) if self._cuda and self.precision in AUTOCAST
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            with forward_errors(padded.shape):
                out = self.module(padded)
            return class_scores(crop_to(out, sizes), self.meta.output)


def load_torchscript(path: str | os.PathLike[str], *, device: str = "cpu") -> torch.jit.ScriptModule:
    """``torch.jit.load`` of a TorchScript archive (a path, or a URL whose bytes are read into memory), in
    eval mode (its code runs in TorchScript's interpreter; no Python object is unpickled). Raises
    :class:`CheckpointError`."""
    local = fsio.local_path(path)
    try:
        with warnings.catch_warnings():  # torch's notice that TorchScript is deprecated: not the user's to act on
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
            module = torch.jit.load(local if local is not None else io.BytesIO(fsio.read_bytes(path)),
                                    map_location=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(f"cannot load TorchScript model {str(path)!r}: {error_line(exc)}"
                              ) from exc
    return module.eval()


class OnnxPredictor(Predictor):
    """An ONNX Runtime session giving ``(N, K, H, W)`` float32 logits of a normalised batch."""

    def __init__(self, session: Any, meta: ModelMeta, *, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(meta, device=device, precision=precision)
        _semantic_only(meta)
        self.session = session
        self.input_name = check_onnx_io(session, meta)

    @classmethod
    def from_record(cls, path: str | os.PathLike[str], meta: ModelMeta, *, device: str = "cpu",
                    precision: str = "fp32") -> "OnnxPredictor":
        return cls(onnx_session(fsio.join(path, MODEL_FILES["onnx"]), device=device), meta, device=device,
                   precision=precision)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        padded, sizes = pad_to_multiple(x.detach().to("cpu", torch.float32), self.meta.input_multiple,
                                        spatial_dims=self.spatial_dims)
        with forward_errors(padded.shape):
            out = self.session.run(None, {self.input_name: padded.contiguous().numpy()})[0]
        return class_scores(crop_to(torch.from_numpy(out), sizes), self.meta.output)


def onnx_session(path: str | os.PathLike[str], *, device: str = "cpu") -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path``: CUDA provider for a CUDA ``device`` when
    available, else CPU; intra-op threads = torch's thread count. Raises :class:`CheckpointError`."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError("ONNX models need onnxruntime: pip install 'segflow[onnx]'") from exc
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.split(":")[1]) if ":" in device else 0
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    elif device.startswith("cuda"):
        log.warning("onnxruntime offers no CUDA execution provider here; running %s on the CPU", path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # onnxruntime's own log would repeat, on stderr, the error each failing run raises (and segflow tells)
    options.log_severity_level = 4  # fatal only
    try:
        local = fsio.local_path(path)  # a URL: the graph's bytes, read into memory
        return ort.InferenceSession(local if local is not None else fsio.read_bytes(path), sess_options=options,
                                    providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise CheckpointError(f"cannot load ONNX model {str(path)!r}: {error_line(exc)}") from exc


def check_onnx_io(session: Any, meta: ModelMeta) -> str:
    """The name of the session's one input, after checking it is a float32 ``(N, C, H, W)`` tensor
    (``(N, C, D, H, W)`` for a record whose ``input_axes`` are ``bczyx``) whose static channel count
    (if any) is ``meta.in_channels``, and that the output has that rank and a static class count
    (if any) of ``meta.num_classes``. Raises :class:`CheckpointError`."""
    volume = meta.spatial_dims == 3
    layout, out_layout = ("(N, C, D, H, W)", "D, H, W") if volume else ("(N, C, H, W)", "H, W")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise CheckpointError(f"the ONNX model has {len(inputs)} inputs; segflow feeds one {layout} batch")
    x = inputs[0]
    if x.type != "tensor(float)" or len(x.shape) != meta.spatial_dims + 2:
        raise CheckpointError(f"the ONNX model's input {x.name!r} is {x.type} of shape {x.shape}; segflow feeds a "
                              f"float32 {layout} batch (export in fp32 with axes {meta.input_axes})")
    if isinstance(x.shape[1], int) and x.shape[1] != meta.in_channels:
        raise CheckpointError(f"the ONNX model takes {x.shape[1]} channel(s) but its record says "
                              f"{meta.in_channels}")
    y = outputs[0].shape
    if len(y) != meta.spatial_dims + 2 or (isinstance(y[1], int) and y[1] != meta.num_classes):
        raise CheckpointError(f"the ONNX model's output has shape {y}; expected (N, {meta.num_classes}, {out_layout}) "
                              f"logits ({meta.num_classes} class names in its record)")
    return x.name


__all__ = ["OnnxPredictor", "TorchScriptPredictor", "check_onnx_io", "load_torchscript", "onnx_session"]
