"""Checkpoints: weights in safetensors plus a JSON metadata record. Nothing is ever unpickled.

File layout: one ``.safetensors`` file whose header metadata holds ``{"segflow": <json>}``, the
JSON being a :class:`ModelMeta`. Loading parses JSON and raw tensors only, so a crafted file
cannot run code. Format changes are keyed by ``ModelMeta.format_version``.

This is the record of a ``runtime="torch"`` model. TorchScript and ONNX models are directories
holding the same :class:`ModelMeta` as JSON beside the model file (:mod:`segcore.models.record`,
which reads either form).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file
from torch import nn

from segcore import fsio
from segcore.errors import CheckpointError, ConfigError, NotFound, a_model, error_line
from segcore.fsio import atomic_path, new_file_mode
from segcore.models import MODEL_KINDS, create_model, spatial_dims_of
from segcore.models.outputs import OutputRule
from segcore.normalise import Normalisation

log = logging.getLogger(__name__)

#: 2 added ``runtime``, ``source``, ``input_axes``, ``input_multiple``, ``output`` and ``halo`` (all
#: defaulted: version 1 records read as torch-runtime models); 3 added ``output.largest_region``
#: (defaulted: earlier records keep every foreground region).
FORMAT_VERSION = 3
RUNTIMES = ("torch", "torchscript", "onnx")
#: ``input_axes`` of a model by its number of spatial axes: images (``bcyx``) or volumes (``bczyx``).
INPUT_AXES = {2: "bcyx", 3: "bczyx"}
_META_KEY = "segflow"
#: Largest safetensors header read (the limit of the safetensors library itself).
_MAX_HEADER = 100_000_000


class ModelMeta(BaseModel):
    """Everything needed to rebuild a model and use it correctly.

    ``class_names[0]`` is the background class; ``len(class_names)`` is the model's number of
    output classes. ``provenance`` records how the weights were produced (command, data, epochs,
    validation scores).

    ``runtime`` says what executes the model: ``torch`` (``arch`` is a registered architecture and
    the weights a safetensors state dict), ``torchscript`` or ``onnx`` (a directory record, see
    :mod:`segcore.models.record`; ``arch`` is then a label of where the model came from).
    ``source`` records the file a model was imported or exported from: ``file`` (name),
    ``format`` and ``sha256`` (of that file's bytes). ``input_axes`` is the layout the model takes:
    ``bcyx`` (batch, channel, y, x: an image model) or ``bczyx`` (batch, channel, z, y, x: a
    volumetric model, e.g. ``unet3d``, see :attr:`spatial_dims`); a torch-runtime record's axes
    must agree with its architecture's ``spatial_dims`` (:func:`build_model` checks). ``input_multiple``: the
    spatial sizes a torchscript/onnx graph accepts are multiples of it; inputs are padded (reflect)
    up to it and outputs cropped back (torch models pad themselves). ``output`` says how labels
    follow from the model's output (:class:`~segcore.models.outputs.OutputRule`: argmax of one
    logit per class, or a one-channel probability above a threshold). ``halo``: pixels of context
    per side that the model's authors prescribe (a bioimage.io package's halo); tiling keeps
    neighbouring tiles overlapping by at least twice that.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    arch: str
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    class_names: tuple[str, ...]
    in_channels: int
    normalisation: Normalisation = Normalisation()
    provenance: dict[str, Any] = Field(default_factory=dict)
    runtime: Literal["torch", "torchscript", "onnx"] = "torch"
    source: dict[str, Any] = Field(default_factory=dict)
    input_axes: str = "bcyx"
    input_multiple: int = Field(default=1, ge=1)
    output: OutputRule = OutputRule()
    halo: int | None = Field(default=None, ge=0)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def kind(self) -> str:
        return MODEL_KINDS.get(self.arch, "semantic")

    @property
    def spatial_dims(self) -> int:
        """3 for a volumetric model (a ``z`` axis in :attr:`input_axes`), else 2."""
        return 3 if "z" in self.input_axes else 2


def check_checkpoint_path(path: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Raise :class:`~segcore.errors.CheckpointError` when a checkpoint file cannot be written at the
    local ``path``: it is a directory, names a directory record (``NAME.segflow``), its folder
    cannot be made or written (:func:`segcore.fsio.write_problem`), or (``overwrite`` False) a file
    is there already. Called before the work that makes the checkpoint (training, an import), so a
    wrong ``--out`` costs nothing and an existing model is replaced only when asked."""
    local = fsio.local_path(path)
    if local is None:
        return
    what = "is a directory" if Path(local).is_dir() else "names a directory record"
    if Path(local).is_dir() or Path(local).suffix.lower() == ".segflow":
        raise CheckpointError(f"{str(path)!r} {what}; a torch checkpoint is a file: give NAME.safetensors")
    if not overwrite and Path(local).exists():
        raise CheckpointError(f"{str(path)!r} exists; give a new --out, or pass --overwrite to replace it "
                              "(overwrite: true in a training spec)")
    problem = fsio.write_problem(local, folder=False)
    if problem:
        raise CheckpointError(f"cannot write the checkpoint {str(path)!r}: {problem}; give another path")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: ModelMeta) -> Path:
    """Write ``model``'s weights and ``meta`` to ``path`` atomically (write, then rename)."""
    path = Path(path)
    if meta.runtime != "torch":
        raise CheckpointError(f"save_checkpoint writes torch-runtime models; {a_model(meta.runtime)} is a directory "
                              "record (segcore.models.record.save_model_record)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: meta.model_dump_json()})
        os.chmod(tmp, new_file_mode())  # safetensors writes 0600: readable like the other outputs
    return path


def read_meta(path: str | os.PathLike[str]) -> ModelMeta:
    """Read only the metadata record of a checkpoint (cheap: no tensors are loaded), at a path or an
    fsspec URL (``s3://bucket/models/unet.safetensors``: only the file's header is fetched)."""
    local = fsio.local_path(path)
    if local is None:
        where = os.fspath(path)
        return _meta_of(_remote_header(where), where=where)
    path = Path(local)
    if not path.is_file():
        raise NotFound(f"checkpoint {str(path)!r} does not exist; train one with 'segflow demo' or pass an existing file or URL")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a segflow checkpoint (a safetensors file with segflow metadata): {exc}"
        ) from exc
    return _meta_of(raw, where=str(path))


def _meta_of(raw: str | None, *, where: str) -> ModelMeta:
    """The :class:`ModelMeta` of a checkpoint's ``segflow`` header entry (None: the entry is missing)."""
    if raw is None:
        raise CheckpointError(f"{where!r} has no segflow metadata; it was not written by segflow.save_checkpoint; "
                              "import a plain state dict with 'segflow model import'")
    meta = parse_meta(raw, where=where)
    if meta.runtime != "torch":
        raise CheckpointError(f"{where!r} is a safetensors file but its metadata names runtime "
                              f"{meta.runtime!r}; such models are directory records (model.json beside the model)")
    return meta


def _header_entry(head: bytes, *, where: str, read_more: Callable[[int], bytes] | None = None) -> str | None:
    """The ``segflow`` entry of a safetensors header: ``head`` holds the file's first bytes (the 8-byte
    little-endian header length, then the JSON header); ``read_more(n)`` gives the first ``n`` bytes when
    ``head`` is shorter than the header."""
    bad = f"{where!r} is not a segflow checkpoint (a safetensors file with segflow metadata)"
    if len(head) < 8:
        raise CheckpointError(f"{bad}: it holds {len(head)} bytes")
    (size,) = struct.unpack("<Q", head[:8])
    if size > _MAX_HEADER:
        raise CheckpointError(f"{bad}: its header claims {size} bytes")
    if len(head) < 8 + size and read_more is not None:
        head = read_more(8 + size)
    try:
        header = json.loads(head[8:8 + size])
        entries = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{bad}: its header is not JSON ({exc})") from exc
    return entries.get(_META_KEY) if isinstance(entries, dict) else None


def _remote_header(location: str) -> str | None:
    """The ``segflow`` header entry of the checkpoint at a URL (two ranged reads: length, then header)."""
    fs, path = fsio.url_to_fs(location)
    try:
        head = fs.cat_file(path, start=0, end=8)
        return _header_entry(head, where=location, read_more=lambda n: fs.cat_file(path, start=0, end=n))
    except FileNotFoundError:
        raise NotFound(f"checkpoint {location!r} does not exist; check the URL and the credentials in the "
                       "environment") from None


def parse_meta(raw: str | bytes, *, where: str) -> ModelMeta:
    """A :class:`ModelMeta` from its JSON text; ``where`` names the record in error messages.
    Raises :class:`CheckpointError` for invalid JSON, invalid fields or a newer format version."""
    try:
        data = json.loads(raw)
        version = int(data.get("format_version", FORMAT_VERSION)) if isinstance(data, dict) else FORMAT_VERSION
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"metadata of {where!r} is not valid JSON: {exc}") from exc
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where!r} has format version {version}; this segflow reads up to "
                              f"{FORMAT_VERSION}. Upgrade segflow.")
    try:
        return ModelMeta.model_validate(data)
    except (ValueError, ValidationError) as exc:
        raise CheckpointError(f"metadata of {where!r} is invalid: {exc}") from exc


def build_model(meta: ModelMeta) -> nn.Module:
    """Build the (untrained) architecture described by ``meta``."""
    kwargs = dict(meta.arch_kwargs)
    for key, value in (("in_channels", meta.in_channels), ("num_classes", meta.num_classes)):
        if kwargs.get(key, value) != value:
            raise CheckpointError(f"checkpoint metadata is inconsistent: arch_kwargs {key}={kwargs[key]} but "
                                  f"the record says {value}")
        kwargs[key] = value
    try:
        model = create_model(meta.arch, **kwargs)
        dims = spatial_dims_of(meta.arch)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"cannot build architecture {meta.arch!r} with arch_kwargs {meta.arch_kwargs}: "
                              f"{exc}") from exc
    if dims != meta.spatial_dims:
        raise CheckpointError(f"checkpoint metadata is inconsistent: architecture {meta.arch!r} takes {dims}-D inputs "
                              f"(input_axes {INPUT_AXES[dims]!r}) but the record says input_axes {meta.input_axes!r}")
    return model


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Load a checkpoint (a path or an fsspec URL) into its architecture; returns ``(model in eval
    mode, meta)``.

    Raises :class:`CheckpointError` when the weights do not fit the architecture named in the
    metadata (missing/unexpected keys or shape mismatches), before any work is fanned out.
    """
    local = fsio.local_path(path)
    if local is None:  # a URL: the file is read once, into memory
        where = os.fspath(path)
        try:
            data = fsio.read_bytes(where)
        except FileNotFoundError:
            raise NotFound(f"checkpoint {where!r} does not exist; check the URL and the credentials in the "
                           "environment") from None
        meta = _meta_of(_header_entry(data, where=where), where=where)
    else:
        meta = read_meta(local)
    model = build_model(meta)
    try:
        state = load_file(str(local), device="cpu") if local is not None else load(data)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read tensors of {str(path)!r}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {str(path)!r} do not fit architecture {meta.arch!r} with "
                              f"{meta.arch_kwargs}: {weights_mismatch(model, state, exc)}") from exc
    return model.to(device).eval(), meta


#: Prefix (Distributed)DataParallel gives every name of the model it wraps; removed on import.
WRAPPER_PREFIX = "module."


def unwrapped_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """``state`` without :data:`WRAPPER_PREFIX` when every one of its names carries it and none of
    ``model``'s does (a state dict saved from a (Distributed)DataParallel-wrapped model), and the
    prefix removed (None: ``state`` as it is)."""
    if state and all(k.startswith(WRAPPER_PREFIX) for k in state) and not any(
            k.startswith(WRAPPER_PREFIX) for k in model.state_dict()):
        return {k[len(WRAPPER_PREFIX):]: v for k, v in state.items()}, WRAPPER_PREFIX
    return state, None


def weights_mismatch(model: nn.Module, state: dict[str, torch.Tensor], error: BaseException | None = None, *,
                     examples: int = 3) -> str:
    """How the tensors ``state`` (name -> tensor) differ from ``model``'s: counts of missing and
    unexpected names and of tensors of another shape, a few of each named, and a hint when the
    file's names differ by a prefix (``module.`` of a model saved from DataParallel); when neither
    names nor shapes differ, torch's own ``error``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def some(names: list[str]) -> str:
        return ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")

    parts = [f"{len(names)} {what} ({some(names)})" for names, what in
             ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape")) if names]
    hint = ""
    if missing and unexpected:
        prefix = os.path.commonprefix(unexpected).rpartition(".")[0]
        if prefix and {k[len(prefix) + 1:] for k in unexpected} >= set(missing):
            hint = f"; the file's names carry the prefix {prefix + '.'!r}: save the inner model's state_dict"
    if not parts:
        return f"the tensors do not load ({error_line(error) if error is not None else 'no name or shape differs'})"
    return "; ".join(parts) + hint
