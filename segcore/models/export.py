"""Export a torch-runtime model record to another runtime: TorchScript or ONNX.

Semantic models only, of images or (``unet3d``) volumes. What is exported is the network without
its own padding (``forward_unpadded`` of a :class:`~segcore.models.padding.PaddedForward` network),
traced once, so the graph takes any ``N`` and any ``H``, ``W`` (and ``D``) that are multiples of the
network's ``input_multiple`` (recorded in the new record with the model's ``input_axes``; the
runtime's predictor pads with the same rule).
The result is a directory record (:mod:`segcore.models.record`) whose ``source`` names the
checkpoint it came from.

``EXPORTERS`` maps a target name to its function ``(model, meta, example, file) -> None``; another
target (e.g. a bioimage.io package) is another entry.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from segcore.errors import CheckpointError, ConfigError, SegflowError, a_model, error_line
from segcore.models.checkpoint import ModelMeta, load_checkpoint
from segcore.models.record import check_record_path, model_sha256, read_model_meta, save_model_record

log = logging.getLogger(__name__)


class Unpadded(nn.Module):
    """``model.forward_unpadded`` as a module's ``forward`` (``model.forward`` for networks that do not pad)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.model, "forward_unpadded", None)
        return fn(x) if fn is not None else self.model(x)


def export_torchscript(model: nn.Module, meta: ModelMeta, example: torch.Tensor, file: Path) -> None:
    """Trace ``model`` on ``example`` and save the TorchScript archive to ``file``."""
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # torch's notice that TorchScript is deprecated: the archive is the format asked for
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(file))


def export_onnx(model: nn.Module, meta: ModelMeta, example: torch.Tensor, file: Path) -> None:
    """ONNX (opset 17, fp32) with dynamic batch and spatial axes: input ``input`` ``(N, C, H, W)``,
    output ``logits`` ``(N, K, H, W)`` (a volumetric model: ``(N, C, D, H, W)`` to ``(N, K, D, H, W)``)."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise ConfigError("exporting to ONNX needs the onnx package: pip install 'segflow[onnx]'") from exc
    spatial = ("depth", "height", "width")[-meta.spatial_dims:]
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(spatial)}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
        torch.onnx.export(model, (example,), str(file), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": axes, "logits": axes})


#: target -> exporter writing the model file of a directory record.
EXPORTERS: dict[str, Callable[[nn.Module, ModelMeta, torch.Tensor, Path], None]] = {
    "torchscript": export_torchscript,
    "onnx": export_onnx,
}


def export_model(path: str | os.PathLike[str], *, to: str, out: str | os.PathLike[str]) -> ModelMeta:
    """Export the torch-runtime record ``path`` to runtime ``to`` (``torchscript`` or ``onnx``) as the
    directory record ``out``; returns the new record's metadata."""
    if to not in EXPORTERS:
        raise ConfigError(f"export target must be one of {', '.join(sorted(EXPORTERS))}, got {to!r}")
    check_record_path(out, to)  # before the export's work
    meta = read_model_meta(path)
    if meta.runtime != "torch":
        raise CheckpointError(f"{str(path)!r} is already {a_model(meta.runtime)}; export from the torch checkpoint")
    if meta.kind != "semantic":
        raise ConfigError(f"{meta.arch!r} is an instance model; only semantic models export to {to} for now")
    model, meta = load_checkpoint(path)
    multiple = int(getattr(model, "input_multiple", 1))
    side = multiple * max(1, -(-(64 if meta.spatial_dims == 2 else 16) // multiple))
    example = torch.zeros(1, meta.in_channels, *[side] * meta.spatial_dims)
    new = meta.model_copy(update={
        "runtime": to, "input_multiple": multiple,
        "source": {"file": Path(path).name, "format": "segflow-checkpoint", "sha256": model_sha256(path)},
        "provenance": {**meta.provenance, "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "exported_with": f"torch {torch.__version__}"}})
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / f"model.{to}"
        try:
            EXPORTERS[to](Unpadded(model).eval(), new, example, file)
        except SegflowError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:  # the tracer's or the network's own refusal
            raise CheckpointError(f"cannot export {str(path)!r} ({meta.arch}) to {to}: {error_line(exc)}") from exc
        save_model_record(out, meta=new, model_path=file)
    log.info("exported %s to %s (%s)", path, out, to)
    return new


__all__ = ["EXPORTERS", "Unpadded", "export_model", "export_onnx", "export_torchscript"]
