"""Export a segflow UNet checkpoint as a bioimage.io model package (a zip with ``rdf.yaml``).

:func:`export_bioimageio` writes, beside the description: the weights as a plain state dict
(``pytorch_state_dict``, its architecture named by ``import_from: segcore.models.unet``) and as
TorchScript (traced; inputs are multiples of the UNet's divisor, so no padding branch is traced);
a test input (a synthetic image, or one given) with the output segflow computes for it; a cover
(the input beside its predicted classes); a README. The preprocessing is the checkpoint's
normalisation (:func:`~segcore.models.bioimage.prescribe.preprocessing_of`), the output one channel
of logits per class (labels: their argmax). ``config.segflow`` keeps segflow's own record
(normalisation, classes, architecture, the checkpoint's sha256).

The package is then checked with the zoo's own tools, offline: ``bioimageio.spec`` validation of
the zip, and ``bioimageio.core``'s model test (every weights format reproduces the test output).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from segcore.errors import CheckpointError, ConfigError
from segcore.figures import display_rgb, overlay_rgb, png_bytes
from segcore.fsio import file_sha256
from segcore.models.bioimage.prescribe import preprocessing_of
from segcore.models.bioimage.zoo import zoo, zoo_core
from segcore.models.checkpoint import load_checkpoint
from segcore.models.outputs import keep_largest_region
from segcore.normalise import normalise_batch
from segcore.synthetic import make_sample

log = logging.getLogger(__name__)

#: Side of the synthetic test image (a multiple of every UNet divisor up to depth 6).
TEST_IMAGE_SIZE = 64
#: U-Net's paper, cited by every exported package.
UNET_CITATION = {"text": "Ronneberger O., Fischer P., Brox T. U-Net: Convolutional Networks for Biomedical Image "
                         "Segmentation. MICCAI 2015.", "doi": "10.1007/978-3-319-24574-4_28"}


class PackageCheckFailed(CheckpointError):
    """The zoo's own tools rejected a package (the message holds their summary)."""


class _Unpadded(torch.nn.Module):
    """The network's forward pass without its own padding (inputs are multiples already): traced,
    it holds no size-dependent constant."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unpadded = getattr(self.net, "forward_unpadded", None)
        return unpadded(x) if unpadded is not None else self.net(x)


def _identifier(name: str) -> str:
    """A bioimage.io channel name: letters, digits and underscores, starting with a letter."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out[:1].isalpha() else f"c_{out}"


def _test_image(sample: np.ndarray | None, *, channels: int, multiple: int) -> np.ndarray:
    """``(H, W, C)`` raw test image: ``sample`` (cropped to a multiple of ``multiple``) or a synthetic one."""
    if sample is None:
        image, _ = make_sample(np.random.default_rng(0), size=TEST_IMAGE_SIZE)
        sample = np.repeat(image[..., None], channels, axis=2)
    sample = np.asarray(sample)
    if sample.ndim == 2:
        sample = sample[..., None]
    if sample.ndim != 3 or sample.shape[2] != channels:
        raise ConfigError(f"the test image must be (H, W) or (H, W, {channels}), got shape {sample.shape}")
    h, w = (s - s % multiple for s in sample.shape[:2])
    if h < multiple or w < multiple:
        raise ConfigError(f"the test image must be at least {multiple} x {multiple} pixels, got {sample.shape[:2]}")
    return sample[:h, :w]


def _space_axes(size: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "space", "id": a, "size": dict(size, axis_id=a) if "axis_id" in size else size} for a in "yx"]


def _readme(name: str, meta: Any, sha256: str) -> str:
    classes = ", ".join(meta.class_names)
    return (f"# {name}\n\nA 2-D UNet for semantic segmentation trained with segflow.\n\n"
            f"- classes (output channels, background first): {classes}\n"
            f"- input: {meta.in_channels} channel(s), any size that is a multiple of "
            f"{2 ** int(meta.arch_kwargs.get('depth', 4))} pixels\n"
            f"- labels: the argmax over the output channels"
            + (", then only the largest connected foreground region of each image (segflow applies this; "
               "the package's tensors are the logits before it)" if meta.output.largest_region else "") + "\n"
            f"- segflow checkpoint sha256: {sha256}\n\n"
            "## Validation\n\nThe test tensors were computed by segflow; the package passes bioimageio.spec "
            "validation and the bioimageio.core model test.\n\n"
            f"## Training\n\n```\n{meta.provenance.get('command', 'see config.segflow.provenance')}\n```\n")


def build_package_folder(checkpoint: str | os.PathLike[str], folder: Path, *, authors: Sequence[str],
                         license: str, name: str | None, description: str | None,
                         sample: np.ndarray | None) -> dict[str, Any]:
    """Write the package files and ``rdf.yaml`` into ``folder``; returns the rdf as a dict."""
    model, meta = load_checkpoint(checkpoint)
    if meta.arch != "unet":
        raise ConfigError(f"bioimage.io export supports segflow UNet checkpoints; {str(checkpoint)!r} is a "
                          f"{meta.arch!r} model")
    if not authors:
        raise ConfigError("a bioimage.io package names its authors: give at least one (--author 'Jane Doe')")
    multiple = 2 ** int(meta.arch_kwargs.get("depth", 4))
    image = _test_image(sample, channels=meta.in_channels, multiple=multiple)
    x = normalise_batch(image[None], meta.normalisation)
    with torch.inference_mode():
        logits = model(x)
    raw = np.ascontiguousarray(image.transpose(2, 0, 1)[None].astype(np.float32))
    np.save(folder / "test_input.npy", raw)
    np.save(folder / "test_output.npy", logits.numpy().astype(np.float32))
    labels = logits.argmax(dim=1).numpy()
    labels = (keep_largest_region(labels) if meta.output.largest_region else labels)[0]  # as segflow's masks
    cover = np.concatenate([display_rgb(image), overlay_rgb(image, labels)], axis=1)
    (folder / "cover.png").write_bytes(png_bytes(cover, colours=None))
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / "weights.pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer notes: inputs are multiples, no branch is traced
        traced = torch.jit.trace(_Unpadded(model).eval(), torch.zeros(1, meta.in_channels, multiple * 2, multiple * 2),
                                 check_trace=False)
    traced.save(str(folder / "weights.torchscript"))
    sha = file_sha256(checkpoint)
    name = name or f"segflow UNet {Path(checkpoint).stem}"
    (folder / "README.md").write_text(_readme(name, meta, sha))
    torch_version = torch.__version__.split("+")[0]
    arch_kwargs = {**meta.arch_kwargs, "in_channels": meta.in_channels, "num_classes": meta.num_classes}
    rdf = {
        "format_version": "0.5.4",
        "type": "model",
        "name": name,
        "description": description or f"2-D UNet segmenting {', '.join(meta.class_names[1:])} (segflow)",
        "authors": [{"name": a} for a in authors],
        "cite": [UNET_CITATION],
        "license": license,
        "documentation": "README.md",
        "covers": ["cover.png"],
        "tags": ["segmentation", "semantic-segmentation", "unet", "2d", "pytorch", "segflow"],
        "inputs": [{
            "id": "raw",
            "axes": [{"type": "batch"},
                     {"type": "channel", "channel_names": [f"channel{i}" for i in range(meta.in_channels)]},
                     *_space_axes({"min": multiple, "step": multiple})],
            "test_tensor": {"source": "test_input.npy"},
            "data": {"type": "float32"},
            "preprocessing": preprocessing_of(meta.normalisation),
        }],
        "outputs": [{
            "id": "logits",
            "axes": [{"type": "batch"},
                     {"type": "channel", "channel_names": [_identifier(c) for c in meta.class_names]},
                     *_space_axes({"tensor_id": "raw", "axis_id": "y"})],
            "test_tensor": {"source": "test_output.npy"},
            "data": {"type": "float32"},
        }],
        "weights": {
            "pytorch_state_dict": {"source": "weights.pt", "pytorch_version": torch_version,
                                   "architecture": {"callable": "UNet", "import_from": "segcore.models.unet",
                                                    "kwargs": arch_kwargs}},
            "torchscript": {"source": "weights.torchscript", "pytorch_version": torch_version,
                            "parent": "pytorch_state_dict"},
        },
        "config": {"segflow": {"arch": meta.arch, "arch_kwargs": dict(meta.arch_kwargs),
                               "class_names": list(meta.class_names), "in_channels": meta.in_channels,
                               "normalisation": meta.normalisation.model_dump(mode="json"),
                               "checkpoint_sha256": sha, "output": "argmax",
                               "largest_region": meta.output.largest_region}},
    }
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return rdf


def check_package(path: str | os.PathLike[str], *, run_model_test: bool = True) -> dict[str, str]:
    """Check a package (zip or rdf.yaml) with the zoo's tools, offline: ``bioimageio.spec``
    validation with file checks, then (``run_model_test``) ``bioimageio.core.test_model``.
    Returns ``{"format": status, "model_test": status}``; raises :class:`PackageCheckFailed`."""
    spec = zoo()
    descr = spec.load_description(Path(path), perform_io_checks=True, format_version="discover")
    summary = descr.validation_summary
    if summary.status not in ("valid-format", "passed"):
        raise PackageCheckFailed(f"bioimageio.spec rejects {os.fspath(path)!r}:\n{summary.format()}")
    result = {"format": str(summary.status)}
    if run_model_test:
        with warnings.catch_warnings():  # torch's notice that TorchScript is deprecated: not the user's to act on
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
            tested = zoo_core().test_model(Path(path))
        if tested.status != "passed":
            raise PackageCheckFailed(f"bioimageio.core's model test fails on {os.fspath(path)!r}:\n{tested.format()}")
        result["model_test"] = str(tested.status)
    return result


def export_bioimageio(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *, authors: Sequence[str],
                      license: str = "CC-BY-4.0", name: str | None = None, description: str | None = None,
                      sample: np.ndarray | None = None, run_model_test: bool = True) -> Path:
    """Write the bioimage.io package of a segflow UNet ``checkpoint`` to the zip file ``out``.

    Args:
        checkpoint: a ``.safetensors`` segflow checkpoint of a UNet.
        out: the zip to write (replaced if it exists).
        authors: names of the model's authors (at least one; the spec requires them).
        license: SPDX licence id of the weights (default CC-BY-4.0).
        name, description: of the package (defaults name the checkpoint and its classes).
        sample: ``(H, W)`` or ``(H, W, C)`` raw test image (default: a 64 x 64 synthetic one).
        run_model_test: also run ``bioimageio.core``'s model test on the zip (about 10 s).

    Raises :class:`PackageCheckFailed` when the zoo's tools reject the package (then no zip is left).
    """
    out = Path(out)
    if out.suffix.lower() != ".zip" or out.is_dir():
        raise ConfigError(f"{str(out)!r} is not a zip file to write; a bioimage.io package is one (NAME.zip)")
    spec = zoo()
    with tempfile.TemporaryDirectory(prefix="segflow-bioimageio-") as tmp:
        folder = Path(tmp) / "package"
        folder.mkdir()
        build_package_folder(checkpoint, folder, authors=authors, license=license, name=name,
                             description=description, sample=sample)
        descr = spec.load_description(folder / "rdf.yaml", perform_io_checks=True)
        if descr.validation_summary.status not in ("valid-format", "passed"):
            raise PackageCheckFailed(f"bioimageio.spec rejects the exported description:\n"
                                     f"{descr.validation_summary.format()}")
        staged = Path(tmp) / out.name
        spec.save_bioimageio_package(descr, output_path=staged)
        check_package(staged, run_model_test=run_model_test)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, out)
    log.info("wrote bioimage.io package %s", out)
    return out


__all__ = ["PackageCheckFailed", "TEST_IMAGE_SIZE", "UNET_CITATION", "build_package_folder", "check_package",
           "export_bioimageio"]
