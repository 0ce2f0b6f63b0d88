"""Import a model trained elsewhere into a segflow model record. Nothing is ever unpickled.

Accepted sources (:func:`detect_format`):

- PyTorch state dicts, ``.pth``/``.pt`` (``torch.save(model.state_dict(), path)``), read ONLY with
  ``torch.load(..., weights_only=True)``: a file carrying any Python object besides tensors and
  plain containers (a pickle payload) is refused, never run; plain state dicts in ``.safetensors``;
  both go into a registered architecture (``arch``) and must fit it exactly (strict load);
- TorchScript archives (a zip holding TorchScript code), loaded with ``torch.jit.load``;
- ONNX files (``.onnx``).

A state dict becomes a ``.safetensors`` checkpoint; TorchScript and ONNX become directory records
(:mod:`segcore.models.record`). ``source`` records the file's name, format and sha256.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from segcore.errors import CheckpointError, ConfigError, NotFound, a_model, error_line
from segcore.fsio import file_sha256
from segcore.models.checkpoint import (INPUT_AXES, ModelMeta, build_model, check_checkpoint_path, save_checkpoint,
                                      unwrapped_state, weights_mismatch)
from segcore.models.detection import COCO_CATEGORIES
from segcore.models.padding import pad_to_multiple
from segcore.models.record import check_record_path, save_model_record
from segcore.models.registry import MODEL_KINDS, MODELS, spatial_dims_of
from segcore.normalise import Normalisation
from segcore.normalise_fit import describe

log = logging.getLogger(__name__)

Format = Literal["state_dict", "safetensors", "torchscript", "onnx"]
#: Named lists of class names (``--class-names coco``).
CLASS_NAME_PRESETS: dict[str, tuple[str, ...]] = {"coco": COCO_CATEGORIES}


def detect_format(path: str | os.PathLike[str]) -> Format:
    """``onnx`` (suffix), ``safetensors`` (suffix), ``torchscript`` (a zip holding TorchScript
    code) or ``state_dict`` (any other file: what ``torch.save`` writes)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"model file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".safetensors":
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any("/code/" in n or n.endswith("constants.pkl") for n in zf.namelist()):
                return "torchscript"
    return "state_dict"


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file: safetensors, or ``torch.load(weights_only=True)`` (a dict of
    tensors, or one under ``state_dict``/``model``). Raises :class:`CheckpointError`, for a pickle
    payload among them."""
    path = Path(path)
    if detect_format(path) == "safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read tensors of {str(path)!r}: {exc}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc) and "GLOBAL" not in str(exc):  # not a pickle torch can read
            raise CheckpointError(f"cannot read {str(path)!r} as a PyTorch state dict: it is not a file "
                                  "torch.save wrote (nor .safetensors)") from exc
        raise CheckpointError(
            f"{str(path)!r} holds Python objects besides tensors (a pickle payload); segflow never unpickles "
            "them. Save the weights alone: torch.save(model.state_dict(), path), or as .safetensors "
            f"(refused: {_unsupported(exc)})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r} as a PyTorch state dict: {error_line(exc, None)}"
                              ) from exc
    except Exception as exc:  # noqa: BLE001 - torch's unpickler fails on foreign bytes with KeyError, IndexError...
        raise CheckpointError(f"cannot read {str(path)!r} as a PyTorch state dict: it is not a file torch.save "
                              f"wrote (nor .safetensors; reading it failed with {type(exc).__name__})") from exc
    for candidate in (obj, *(obj.get(k) for k in ("state_dict", "model") if isinstance(obj, dict))):
        if isinstance(candidate, dict) and candidate and all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in candidate.items()):
            return dict(candidate)
    raise CheckpointError(f"{str(path)!r} is not a state dict (name -> tensor), nor one under 'state_dict' or "
                          "'model'; save it with torch.save(model.state_dict(), path)")


def _unsupported(exc: Exception) -> str:
    """The line of torch's weights-only refusal that names the offending global."""
    lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln or "GLOBAL" in ln]
    return (lines[0] if lines else " ".join(str(exc).split()))[:200]


def resolve_class_names(names: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"coco"`` (a preset), ``"a,b,c"`` or a sequence -> names, background first; None stays None."""
    if names is None:
        return None
    if isinstance(names, str):
        if names.strip().lower() in CLASS_NAME_PRESETS:
            return CLASS_NAME_PRESETS[names.strip().lower()]
        names = names.split(",")
    out = tuple(n.strip() for n in names)
    if len(out) < 2 or not all(out):
        raise ConfigError(f"class names need the background and at least one class, none empty; got {out}")
    return out


def trained_defaults(arch: str) -> dict[str, Any]:
    """Builder options of segflow's own UNets as ``segflow train`` gives them (``unet``: base 16, depth
    3; ``unet3d``: base 8, depth 3), which an imported state dict of that architecture is built with
    unless ``arch_kwargs`` say otherwise; ``{}`` (the builder's defaults) for other architectures."""
    from segcore.config import VOLUME_DEFAULTS, train_defaults

    if arch == "unet":
        return dict(train_defaults("semantic")["arch_kwargs"])
    if arch == "unet3d":
        return dict(VOLUME_DEFAULTS["arch_kwargs"])
    return {}


def builder_defaults(arch: str) -> dict[str, Any]:
    """The keyword defaults of ``arch``'s builder, less ``in_channels`` and ``num_classes``."""
    params = inspect.signature(MODELS[arch]).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and p.name not in ("in_channels", "num_classes")}


def import_model(source: str | os.PathLike[str], *, out: str | os.PathLike[str], arch: str | None = None,
                 arch_kwargs: dict[str, Any] | None = None, class_names: str | Sequence[str] | None = None,
                 in_channels: int | None = None, normalisation: Normalisation | None = None,
                 kind: str | None = None, input_multiple: int | None = None) -> ModelMeta:
    """Import ``source`` into the model record ``out``; returns its metadata.

    State dicts need ``arch`` (a registered architecture) and ``class_names``; ``in_channels`` and
    ``normalisation`` default to the builder's (its ``in_channels`` default, its ``normalisation``
    attribute, else percentile), and ``arch_kwargs`` are merged over :func:`trained_defaults`
    (without ``arch_kwargs``, a state dict that does not fit those is tried with the builder's own
    defaults before it is refused). TorchScript/ONNX models are semantic: a trial forward pass checks
    they map ``(1, C, H, W)`` to ``(1, K, H, W)``; ``class_names`` default to ``background,
    class_1, ...``. Raises :class:`ConfigError` or :class:`CheckpointError` before writing anything.
    """
    fmt = detect_format(source)
    names = resolve_class_names(class_names)
    src = {"file": Path(source).name, "format": fmt, "sha256": file_sha256(source)}
    provenance = {"imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if fmt in ("state_dict", "safetensors"):
        if arch is None or arch not in MODELS:
            close = [m for m in MODELS if arch is not None and m.lower() == arch.lower()]
            raise ConfigError((f"unknown --arch {arch!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                               if arch is not None else "a state dict needs --arch")
                              + f"; one of: {', '.join(sorted(MODELS))}")
        if kind is not None and kind != MODEL_KINDS[arch]:
            raise ConfigError(f"architecture {arch!r} is a {MODEL_KINDS[arch]} model, not {kind}")
        if names is None:
            raise ConfigError("a state dict needs --class-names (background first, e.g. background,cell; or coco)")
        check_checkpoint_path(out, overwrite=True)  # the CLI asks for --overwrite before (flows/cli.py)
        builder = MODELS[arch]
        default_c = inspect.signature(builder).parameters.get("in_channels")
        channels = in_channels or (default_c.default if default_c is not None else 1)
        norm = normalisation or getattr(builder, "normalisation", None) or Normalisation()
        options = [{**trained_defaults(arch), **(arch_kwargs or {})}]
        if trained_defaults(arch) and not arch_kwargs:  # else the builder's own defaults, as before
            options.append(builder_defaults(arch))
        raw, tried, hint = read_state_dict(source), [], None
        for kwargs in options:
            meta = ModelMeta(arch=arch, arch_kwargs=kwargs, class_names=names, in_channels=int(channels),
                             normalisation=norm, provenance=provenance, source=src,
                             input_axes=INPUT_AXES[spatial_dims_of(arch)])
            _check_normalisation(meta)
            model = build_model(meta)
            state, removed = unwrapped_state(model, raw)
            if removed:
                meta = meta.model_copy(update={"provenance": {**provenance, "name_prefix_removed": removed}})
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                tried.append(f"with {({**builder_defaults(arch), **kwargs})}: {weights_mismatch(model, state, exc)}")
                hint = hint or size_hint(model, state, classes=len(names), channels=int(channels))
                continue
            save_checkpoint(out, model, meta)
            return meta
        raise CheckpointError(f"the weights in {str(source)!r} do not fit {arch!r} " + "; nor ".join(tried)
                              + (f"; {hint}" if hint else "; other options go in --arch-kwargs"))
    if kind not in (None, "semantic"):
        raise ConfigError(f"{fmt} models are imported as semantic models; import an instance model's state dict "
                          "with --arch (e.g. torchvision:maskrcnn_resnet50_fpn)")
    if in_channels is None:
        raise ConfigError(f"{a_model(fmt)} needs --in-channels (the channels of the images it takes)")
    meta = ModelMeta(arch=arch or fmt, arch_kwargs=dict(arch_kwargs or {}), class_names=names or ("background", "x"),
                     in_channels=int(in_channels), normalisation=normalisation or Normalisation(),
                     provenance=provenance, source=src, runtime=fmt, input_multiple=int(input_multiple or 1))
    _check_normalisation(meta)
    check_record_path(out, fmt)
    k = _trial_classes(source, meta)
    if names is None:
        meta = meta.model_copy(update={"class_names": ("background", *(f"class_{i}" for i in range(1, k)))})
    elif k != len(names):
        raise CheckpointError(f"the model gives {k} class scores per pixel but {len(names)} class names were given")
    save_model_record(out, meta=meta, model_path=source)
    return meta


def size_hint(model: torch.nn.Module, state: dict[str, torch.Tensor], *, classes: int, channels: int) -> str | None:
    """What to change when the file's tensors differ from ``model``'s in the class count or the input
    channels only (every tensor of another shape differs in one axis, where the model has
    ``classes`` or ``channels``; None when the two counts are equal: which one is meant is not
    known), or in the number of spatial axes of their convolutions (a 3-D model's weights); else None."""
    own, got = model.state_dict(), {"classes": set(), "channels": set()}
    deeper = [k for k, t in state.items() if k in own and t.dim() == own[k].dim() + 1 and own[k].dim() >= 3]
    if deeper and all(state[k].dim() == own[k].dim() for k in state if k in own and k not in deeper):
        return (f"the file's convolutions have one spatial axis more than the model's ({deeper[0]} "
                f"{tuple(state[deeper[0]].shape)} in the file, {tuple(own[deeper[0]].shape)} in the model): its model "
                "is volumetric (3-D), this architecture takes 2-D images")
    if classes == channels:
        return None
    for k, t in state.items():
        if k not in own or tuple(own[k].shape) == tuple(t.shape):
            continue
        diff = [(a, b) for a, b in zip(own[k].shape, t.shape) if a != b]
        if own[k].dim() != t.dim() or len(diff) != 1 or diff[0][0] not in (classes, channels):
            return None
        got["classes" if diff[0][0] == classes else "channels"].add(int(diff[0][1]))
    if len(got["classes"]) > 1 or len(got["channels"]) > 1 or not (got["classes"] or got["channels"]):
        return None
    hints = []
    if got["channels"]:
        n = next(iter(got["channels"]))
        hints.append(f"the file's model takes {n} input channel(s), not {channels}: give --in-channels {n}")
    if got["classes"]:
        k = next(iter(got["classes"]))
        hints.append(f"the file's model gives {k} class scores per pixel but {classes} class names were given: give "
                     f"{k} names to --class-names")
    return "; ".join(hints)


def _check_normalisation(meta: ModelMeta) -> None:
    """Refuse, before anything is written, a normalisation that no run could apply to the model
    (:func:`segcore.run.start.check_normalisation`: e.g. ImageNet's three means for a 1-channel model)."""
    from segcore.run.start import check_normalisation  # the run path imports this module's neighbours

    try:
        check_normalisation(meta)
    except CheckpointError as exc:
        raise CheckpointError(f"--normalisation {describe(meta.normalisation)!r} does not fit this model: "
                              f"{str(exc).removesuffix('; the record is inconsistent')}") from exc


def _trial_classes(source: str | os.PathLike[str], meta: ModelMeta) -> int:
    """Class scores per pixel of a TorchScript/ONNX model, from forward passes on zeros: an even
    size, then an odd one (each padded to the record's ``input_multiple``), so that a model that
    needs sizes of a multiple it was not given is told now rather than by every run's images."""
    from segcore.models.runtimes import load_torchscript, onnx_session

    side = max(48, 2 * meta.input_multiple)
    run = None
    k = 0
    for h, w in ((side, side + 8), (side + 13, side + 11)):
        x, _ = pad_to_multiple(torch.zeros(1, meta.in_channels, h, w), meta.input_multiple)
        try:
            if meta.runtime == "torchscript":
                run = run or load_torchscript(source)
                with torch.inference_mode():
                    y = run(x)
            else:
                run = run or onnx_session(source)
                y = torch.from_numpy(run.run(None, {run.get_inputs()[0].name: x.numpy()})[0])
        except CheckpointError:
            raise
        except Exception as exc:  # the model's own failure on a (1, C, H, W) float32 batch
            why = error_line(exc)
            if k:  # it ran on the even size: it wants sizes of a multiple, or takes one size only
                raise CheckpointError(
                    f"the {meta.runtime} model ran on a (1, {meta.in_channels}, {side}, {side + 8}) batch but failed "
                    f"on ({x.shape[2]}, {x.shape[3]}) (padded to a multiple of {meta.input_multiple}): {why}; give "
                    "--input-multiple M (2**depth for a UNet: images are padded to multiples of M); a model traced "
                    "or exported at one fixed size needs exporting again with dynamic height and width") from exc
            raise CheckpointError(f"the {meta.runtime} model failed on a (1, {meta.in_channels}, {x.shape[2]}, "
                                  f"{x.shape[3]}) float32 batch: {why}; check --in-channels and --input-multiple, and "
                                  "that it takes any height and width (an export with dynamic axes)") from exc
        if not isinstance(y, torch.Tensor) or y.ndim != 4 or y.shape[0] != 1 \
                or tuple(y.shape[2:]) != tuple(x.shape[2:]) or y.shape[1] < 2:
            raise CheckpointError(f"the {meta.runtime} model maps {tuple(x.shape)} to "
                                  f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}; segflow "
                                  "needs (N, K, H, W) logits with K >= 2 at the input's size")
        k = int(y.shape[1])
    return k


__all__ = ["CLASS_NAME_PRESETS", "detect_format", "import_model", "read_state_dict", "resolve_class_names"]
