"""Import a bioimage.io model package (a ``.zip`` or a folder with ``rdf.yaml``) as a segflow model record.

:func:`import_bioimageio` extracts a zip safely (:func:`segcore.archives.safe_extract_zip`), reads
and validates the description with ``bioimageio.spec`` (offline: no URL is fetched; segflow checks
the sha256 of the weights file it uses), maps its axes, preprocessing and output onto a
:class:`~segcore.models.checkpoint.ModelMeta` (:mod:`segcore.models.bioimage.prescribe`) and writes:

- ``pytorch_state_dict`` weights whose architecture is segflow's own UNet (``import_from:
  segcore.models.unet``): a torch checkpoint (``.safetensors``), read with
  ``torch.load(weights_only=True)`` only — a pickle that needs anything but tensors is refused;
- else ``torchscript`` or ``onnx`` weights: a directory record (:mod:`segcore.models.record`).

Architecture code shipped in a package (``pytorch_state_dict`` with a source file, or a library
segflow does not know) is never executed: such a package is refused unless it also has
TorchScript or ONNX weights. Spatial size hints (``min``/``step`` of the input's y and x) become
``input_multiple``, an output ``halo`` becomes ``halo`` (tiling defaults); the output rule is
recorded in ``output``.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from segcore.archives import safe_extract_zip
from segcore.errors import CheckpointError, ConfigError, NotFound, error_line
from segcore.fsio import file_sha256
from segcore.models import create_model
from segcore.models.bioimage.prescribe import (
    UnsupportedPackage,
    normalisation_from_inputs,
    output_rule_from_outputs,
    steps_of,
)
from segcore.models.bioimage.zoo import zoo
from segcore.models.checkpoint import (ModelMeta, check_checkpoint_path, save_checkpoint, unwrapped_state,
                                      weights_mismatch)
from segcore.models.record import check_record_path, save_model_record
from segcore.normalise import Normalisation

log = logging.getLogger(__name__)

#: Weights formats segflow can run, in the order ``weights="auto"`` tries them.
WEIGHTS_ORDER = ("pytorch_state_dict", "torchscript", "onnx")
#: The architecture a ``pytorch_state_dict`` entry may name (module, callable) -> registry name.
KNOWN_ARCHITECTURES = {("segcore.models.unet", "UNet"): "unet"}
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")


class UnsafeWeights(CheckpointError):
    """Weights that would need arbitrary code to load (a pickle of anything but tensors)."""


def find_rdf(folder: Path) -> Path:
    """The description file of an extracted package folder (``rdf.yaml``, ``bioimageio.yaml`` or
    ``*.bioimageio.yaml`` at its top)."""
    for name in RDF_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.bioimageio.yaml"))
    if len(found) == 1:
        return found[0]
    raise NotFound(f"{str(folder)!r} holds no rdf.yaml (or bioimageio.yaml); it is not a bioimage.io model package")


def load_model_description(rdf: Path) -> Any:
    """The validated ``bioimageio.spec`` v0.5 model description of ``rdf`` (older formats are converted),
    without network access. Raises :class:`UnsupportedPackage` when the spec rejects it."""
    spec = zoo()
    descr = spec.load_description(rdf, perform_io_checks=False, format_version="latest")
    summary = descr.validation_summary
    if summary.status not in ("valid-format", "passed"):
        errors = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for d in summary.details for e in d.errors)[:1500]
        raise UnsupportedPackage(f"bioimageio.spec rejects {str(rdf)!r}: {errors or summary.status}")
    if str(getattr(descr, "type", "")) != "model":
        raise UnsupportedPackage(f"{str(rdf)!r} describes a {getattr(descr, 'type', '?')!r}, not a model")
    return descr


def _local_file(entry: Any, root: Path, *, what: str) -> Path:
    """The package-local file of a weights entry, its sha256 checked when the description gives one."""
    source = str(entry.source)
    if "://" in source:
        raise UnsupportedPackage(f"the {what} weights are at {source}; segflow imports packages whose files are "
                                 "inside them (download the package with its weights first)")
    path = (root / getattr(entry.source, "path", source)).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise UnsupportedPackage(f"the {what} weights file {source!r} is not inside the package")
    expected = getattr(entry, "sha256", None)
    if expected is not None and file_sha256(path) != str(expected):
        raise CheckpointError(f"the {what} weights file {source!r} does not match the sha256 in the description; "
                              "the package is damaged or was altered")
    return path


def safe_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict read with ``torch.load(weights_only=True)``: tensors and plain containers only.
    Raises :class:`UnsafeWeights` for a pickle that would need anything else (code never runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError,
            zipfile.BadZipFile) as exc:
        raise UnsafeWeights(f"refusing the weights {str(path)!r}: they are not a plain state dict that "
                            f"torch.load(weights_only=True) can read ({error_line(exc, 200)}); segflow "
                            "never unpickles code. Ask for torchscript, onnx or safetensors-compatible weights.") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeWeights(f"{str(path)!r} is not a state dict (name -> tensor)")
    return state


def _known_architecture(entry: Any) -> str | None:
    arch = getattr(entry, "architecture", None)
    key = (str(getattr(arch, "import_from", "")), str(getattr(arch, "callable", "")))
    return KNOWN_ARCHITECTURES.get(key)


def choose_weights(descr: Any, weights: str) -> str:
    """The weights format to import: ``weights`` if the package has it (``auto``: the first runnable
    one of :data:`WEIGHTS_ORDER`). Raises :class:`UnsupportedPackage` when none is runnable."""
    present = {f for f in WEIGHTS_ORDER if getattr(descr.weights, f, None) is not None}
    runnable = {f for f in present if f != "pytorch_state_dict"
                or _known_architecture(descr.weights.pytorch_state_dict) is not None}
    if weights != "auto":
        if weights not in WEIGHTS_ORDER:
            raise ConfigError(f"weights must be auto or one of {WEIGHTS_ORDER}, got {weights!r}")
        if weights not in runnable:
            raise UnsupportedPackage(f"the package has no runnable {weights} weights (runnable here: "
                                     f"{sorted(runnable) or 'none'})")
        return weights
    for fmt in WEIGHTS_ORDER:
        if fmt in runnable:
            return fmt
    if "pytorch_state_dict" in present:
        arch = descr.weights.pytorch_state_dict.architecture
        where = getattr(arch, "import_from", None) or getattr(arch, "source", "a file in the package")
        raise UnsupportedPackage(f"the package's only runnable weights are a pytorch_state_dict whose architecture "
                                 f"({where}) is code segflow does not know; segflow never runs architecture code "
                                 "shipped with a package. Ask for torchscript or onnx weights.")
    raise UnsupportedPackage(f"the package has no weights segflow can run (torchscript, onnx, or a "
                             f"pytorch_state_dict of segflow's UNet); it has {sorted(present) or 'none'}")


def _input_multiple(descr: Any) -> int:
    steps = []
    for axis in descr.inputs[0].axes:
        size = getattr(axis, "size", None)
        if str(axis.type) == "space" and size is not None and hasattr(size, "step"):
            steps.append(int(size.step) if size.step else int(size.min))
    multiple = max(steps, default=1)
    return max(1, multiple)


def _halo(descr: Any) -> int | None:
    halos = [int(axis.halo) for axis in descr.outputs[0].axes if getattr(axis, "halo", None)]
    return max(halos) if halos else None


def _own_record(descr: Any) -> dict[str, Any]:
    """``config.segflow`` of a package segflow exported (empty for others)."""
    config = getattr(descr, "config", None)
    own = (getattr(config, "model_extra", None) or {}).get("segflow") if config is not None else None
    return own if isinstance(own, dict) else {}


def _normalisation(descr: Any, prescribed: Normalisation) -> Normalisation:
    """A package segflow exported carries its record in ``config.segflow``: its normalisation is
    used when it prescribes the same operations (it differs only by the spec's 1e-6 ``eps``)."""
    own = _own_record(descr)
    if "normalisation" in own:
        recorded = Normalisation.model_validate(own["normalisation"])
        if steps_of(recorded) == prescribed.steps:
            return recorded
    return prescribed


def import_bioimageio(package: str | os.PathLike[str], out: str | os.PathLike[str], *,
                      weights: str = "auto") -> tuple[Path, ModelMeta]:
    """Import the bioimage.io model ``package`` (zip or folder) as the segflow model record ``out``.

    ``out``: a ``.safetensors`` file for torch weights, else a directory (e.g. ``NAME.segflow``),
    checked as soon as the weights are chosen (before they are read).
    ``weights``: ``auto`` or a format of :data:`WEIGHTS_ORDER`. Returns ``(record path, meta)``.
    """
    package = Path(package)
    if not package.exists():
        raise NotFound(f"bioimage.io package {str(package)!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="segflow-import-") as tmp:
        root = safe_extract_zip(package, Path(tmp) / "package") if package.is_file() else package
        rdf = find_rdf(root)
        descr = load_model_description(rdf)
        prescribed, channels = normalisation_from_inputs(descr.inputs)
        rule, class_names = output_rule_from_outputs(descr.outputs)
        if _own_record(descr).get("largest_region") is True:  # segflow's own rule, applied after the argmax
            rule = rule.model_copy(update={"largest_region": True})
        fmt = choose_weights(descr, weights)
        if fmt == "pytorch_state_dict":  # the place of the record, before the weights are read
            check_checkpoint_path(out, overwrite=True)  # the CLI asks for --overwrite before (flows/cli.py)
        else:
            check_record_path(out, fmt)
        entry = getattr(descr.weights, fmt)
        path = _local_file(entry, rdf.parent, what=fmt)
        sha = file_sha256(path)
        common: dict[str, Any] = dict(
            class_names=class_names, in_channels=channels, normalisation=_normalisation(descr, prescribed),
            output=rule, halo=_halo(descr), input_multiple=_input_multiple(descr),
            source={"file": package.name, "format": f"bioimageio:{fmt}", "sha256": sha,
                    "package_sha256": file_sha256(package) if package.is_file() else None,
                    "name": str(descr.name)},
            provenance={"imported_from": str(package), "bioimageio_name": str(descr.name),
                        "authors": [str(a.name) for a in descr.authors]})
        if fmt == "pytorch_state_dict":
            arch = _known_architecture(entry)
            kwargs = {k: v for k, v in dict(entry.architecture.kwargs).items()
                      if k not in ("in_channels", "num_classes")}
            meta = ModelMeta(arch=arch, arch_kwargs=kwargs, runtime="torch", **common)
            model = create_model(arch, in_channels=channels, num_classes=len(class_names), **kwargs)
            state, removed = unwrapped_state(model, safe_state_dict(path))
            if removed:
                meta = meta.model_copy(update={"provenance": {**meta.provenance, "name_prefix_removed": removed}})
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"the state dict of {str(package)!r} does not fit {arch} with {kwargs}: "
                                      f"{weights_mismatch(model, state, exc)}") from exc
            record = save_checkpoint(out, model, meta)
        else:
            meta = ModelMeta(arch=f"bioimageio:{descr.name}", runtime=fmt, **common)
            record = save_model_record(out, meta=meta, model_path=path)
    log.info("imported %s (%s weights) as %s", package, fmt, record)
    return Path(record), meta


__all__ = ["KNOWN_ARCHITECTURES", "RDF_NAMES", "UnsafeWeights", "WEIGHTS_ORDER", "choose_weights", "find_rdf",
           "import_bioimageio", "load_model_description", "safe_state_dict"]
