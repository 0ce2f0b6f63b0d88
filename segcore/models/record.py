"""The model record: what ``--checkpoint`` names, whatever runtime executes the model.

Two forms, one :class:`~segcore.models.checkpoint.ModelMeta`:

- ``runtime="torch"``: one ``.safetensors`` file (weights + metadata), written by
  :func:`segcore.models.checkpoint.save_checkpoint`;
- ``runtime="torchscript"`` or ``"onnx"``: a directory, by convention ``NAME.segflow/``, holding
  ``model.json`` (the metadata) and the model file (``model.ts`` or ``model.onnx``), written by
  :func:`save_model_record`.

:func:`read_model_meta` reads the metadata of either form (cheap: no weights are loaded) and
:func:`model_sha256` names the content (a run's key, the incremental run directory and the
predictor cache use it). Loading a model to predict is :func:`segcore.models.predict.open_predictor`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from segcore import fsio
from segcore.errors import CheckpointError, NotFound, a_model
from segcore.fsio import file_sha256
from segcore.models.checkpoint import ModelMeta, parse_meta, read_meta

log = logging.getLogger(__name__)

#: File of a directory record that holds its :class:`ModelMeta` as JSON.
META_FILE = "model.json"
#: Model file of a directory record, by runtime.
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
#: Conventional suffix of a directory record.
RECORD_SUFFIX = ".segflow"
#: Suffixes of model files, never of a directory record (``--out net.onnx`` would make a directory of that name).
FILE_SUFFIXES = (".onnx", ".pt", ".pth", ".ts", ".safetensors", ".zip", ".json", ".bin", ".ckpt")


def read_model_meta(path: str | os.PathLike[str]) -> ModelMeta:
    """The :class:`ModelMeta` of a model record: a ``.safetensors`` checkpoint or a directory
    record (``model.json`` + model file), at a path or an fsspec URL. Raises
    :class:`~segcore.errors.NotFound` for a missing record and :class:`~segcore.errors.CheckpointError`
    for anything else that is not a record."""
    if fsio.local_path(path) is None:
        return _remote_meta(os.fspath(path))
    path = Path(path)
    if path.is_file():
        return read_meta(path)
    if not path.is_dir():
        raise NotFound(f"model {str(path)!r} does not exist; pass a .safetensors checkpoint or a model directory "
                       "made by 'segflow model import' or 'segflow model export'")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{str(path)!r} is a directory without {META_FILE}; it is not a segflow model record "
                              "(make one with 'segflow model import')")
    meta = _directory_meta(meta_path.read_bytes(), where=str(meta_path))
    if not (path / MODEL_FILES[meta.runtime]).is_file():
        raise CheckpointError(f"model record {str(path)!r} ({meta.runtime}) lacks its model file "
                              f"{MODEL_FILES[meta.runtime]}")
    return meta


def _directory_meta(raw: bytes, *, where: str) -> ModelMeta:
    meta = parse_meta(raw, where=where)
    if meta.runtime not in MODEL_FILES:
        raise CheckpointError(f"{where!r} names runtime {meta.runtime!r}, whose models are single "
                              ".safetensors files, not directories")
    return meta


def _remote_meta(location: str) -> ModelMeta:
    """:func:`read_model_meta` of a record at a URL (a checkpoint: its header only)."""
    fs, path = fsio.url_to_fs(location)
    if fs.isfile(path):
        return read_meta(location)
    if not fs.isdir(path):
        raise NotFound(f"model {location!r} does not exist; check the URL and the credentials in the environment")
    meta_location = fsio.join(location, META_FILE)
    try:
        meta = _directory_meta(fsio.read_bytes(meta_location), where=meta_location)
    except FileNotFoundError:
        raise CheckpointError(f"{location!r} is a directory without {META_FILE}; it is not a segflow model record "
                              "(make one with 'segflow model import')") from None
    if not fsio.exists(fsio.join(location, MODEL_FILES[meta.runtime])):
        raise CheckpointError(f"model record {location!r} ({meta.runtime}) lacks its model file "
                              f"{MODEL_FILES[meta.runtime]}")
    return meta


def model_file(path: str | os.PathLike[str]) -> str:
    """The location of the file holding the model of a record (a path or URL, as ``path``): the
    checkpoint itself, or a directory record's ``model.ts`` / ``model.onnx``."""
    meta = read_model_meta(path)
    return os.fspath(path) if meta.runtime == "torch" else fsio.join(path, MODEL_FILES[meta.runtime])


@contextmanager
def local_record(path: str | os.PathLike[str]) -> Iterator[str]:
    """A local path holding the model record ``path``: ``path`` itself when it is local, else a
    temporary copy (its file, or every file of a directory record, fetched once; removed on exit),
    so that loading it and hashing it read the object store once, not once each. A missing record
    is :class:`~segcore.errors.NotFound`; its content is not checked here (callers read its metadata
    with :func:`read_model_meta` first)."""
    location = os.fspath(path)
    fs, where = fsio.url_to_fs(location)
    is_file = fs.isfile(where)
    if not is_file and not fs.isdir(where):
        raise NotFound(f"model {location!r} does not exist")
    local = fsio.local_path(path)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="segflow-model-") as tmp:
        copy = Path(tmp) / "model"  # a fixed name: a URL's last part may hold a query string
        if is_file:
            copy.write_bytes(fsio.read_bytes(location))
        else:
            for rel, source in fsio.tree(location):
                (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                (copy / rel).write_bytes(fsio.read_bytes(source))
        yield str(copy)


def model_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 naming a record's content (at a path or URL: the same bytes give the same hash): a
    file's sha256, or for a directory the sha256 of its files' ``relative/path NUL sha256`` lines in
    sorted order (stable across copies and machines)."""
    fs, where = fsio.url_to_fs(path)
    if fs.isfile(where):
        return file_sha256(path)
    if not fs.isdir(where):
        raise NotFound(f"model {str(path)!r} does not exist")
    h = hashlib.sha256()
    for rel, location in sorted(fsio.tree(path), key=lambda entry: entry[0].split("/")):  # as pathlib sorts
        h.update(f"{rel}\0{file_sha256(location)}\n".encode())
    return h.hexdigest()


def check_record_path(path: str | os.PathLike[str], runtime: str) -> None:
    """Raise :class:`~segcore.errors.CheckpointError` unless a directory record of ``runtime`` may be
    written at ``path``: a new name, an empty directory or a record (replaced), not a file, a name
    with a model file's suffix, or a directory of other files (which would be deleted)."""
    path = Path(path)
    if path.is_file() or path.suffix.lower() in FILE_SUFFIXES:
        raise CheckpointError(f"{str(path)!r} {'is' if path.is_file() else 'names'} a file; "
                              f"{a_model(runtime)} record is a directory (e.g. {path.stem}{RECORD_SUFFIX})")
    problem = fsio.write_problem(path, folder=True) or fsio.write_problem(path.parent, folder=True)
    if problem:
        raise CheckpointError(f"cannot write the model record {str(path)!r}: {problem}; give another path")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in (META_FILE, *MODEL_FILES.values()))
        if others or not (path / META_FILE).is_file() and any(path.iterdir()):
            # only ever replace a model record, never a folder of other files
            raise CheckpointError(f"{str(path)!r} is a directory that is not a model record (it holds "
                                  f"{', '.join(others[:3]) or 'no ' + META_FILE}{' ...' if len(others) > 3 else ''}); "
                                  f"give a new name for the record, e.g. {str(path / ('model' + RECORD_SUFFIX))!r}")


def save_model_record(path: str | os.PathLike[str], *, meta: ModelMeta, model_path: str | os.PathLike[str]) -> Path:
    """Write a directory record at ``path``: ``model.json`` from ``meta`` and a copy of
    ``model_path`` (a TorchScript archive or an ONNX file, as ``meta.runtime`` says). The directory
    is built beside ``path`` and renamed into place; an existing record at ``path`` is replaced, any
    other directory there refused (:class:`~segcore.errors.CheckpointError`): nothing else is deleted."""
    path = Path(path)
    if meta.runtime not in MODEL_FILES:
        raise CheckpointError(f"a directory record holds a torchscript or onnx model, not {meta.runtime!r}; "
                              "write torch models with save_checkpoint")
    check_record_path(path, meta.runtime)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(model_path, tmp / MODEL_FILES[meta.runtime])
        (tmp / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote %s model record %s", meta.runtime, path)
    return path


def describe_model(path: str | os.PathLike[str]) -> dict[str, object]:
    """What a record says, for people (``segflow model info``): runtime and architecture, input
    axes/channels/multiple, classes, normalisation, provenance (with the source file's sha256), the
    output contract and the record's own sha256. JSON-able."""
    meta = read_model_meta(path)
    if meta.kind == "semantic":
        rule = meta.output
        dtype = "uint8" if meta.num_classes <= 256 else "uint16"
        space = "D, H, W" if meta.spatial_dims == 3 else "H, W"  # a volumetric model's inputs and outputs
        if rule.rule == "threshold":
            contract = (f"(N, 1, {space}) float output for (N, {meta.in_channels}, {space}) float32 inputs"
                        + (f", then {len(rule.steps)} postprocessing step(s)" if rule.steps else "")
                        + f"; masks are class 1 where it exceeds {rule.threshold:g}: ({space}) {dtype} class ids")
        else:
            contract = (f"(N, {meta.num_classes}, {space}) float logits for (N, {meta.in_channels}, {space}) float32 "
                        "inputs" + (f", then {len(rule.steps)} postprocessing step(s)" if rule.steps else "")
                        + f"; masks are their argmax: ({space}) {dtype} class ids")
        if rule.largest_region:
            contract += ("; only the largest connected foreground region of each image is kept (whole images; "
                         "blocks of tiled images without it)")
    else:
        overlap = meta.arch_kwargs.get("overlap_threshold")
        pasting = ("higher scores win overlaps" if overlap is None else
                   f"higher scores win overlaps, and a detection whose mask higher-scoring ones hold more than "
                   f"{overlap:g} of is dropped")
        contract = ("per image: boxes (K, 4) x0 y0 x1 y1 px, labels (K,) class ids 1.."
                    f"{meta.num_classes - 1}, scores (K,), masks (K, 1, 28, 28) probabilities over each box; "
                    f"written as (H, W) uint32 instance labels ({pasting}) and one row per instance")
    return {"model": str(path), "sha256": model_sha256(path), "runtime": meta.runtime, "arch": meta.arch,
            "arch_kwargs": meta.arch_kwargs, "kind": meta.kind,
            "input": {"axes": meta.input_axes, "channels": meta.in_channels, "multiple": meta.input_multiple,
                      "dtype": "float32"},
            "classes": list(meta.class_names), "normalisation": meta.normalisation.model_dump(mode="json"),
            "source": meta.source, "provenance": meta.provenance, "output": contract,
            "format_version": meta.format_version}


__all__ = ["FILE_SUFFIXES", "META_FILE", "MODEL_FILES", "RECORD_SUFFIX", "check_record_path", "describe_model",
           "local_record", "model_file", "model_sha256", "read_model_meta", "save_model_record"]
