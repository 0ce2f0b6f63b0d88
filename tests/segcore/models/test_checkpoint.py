"""Tests for segcore.models.checkpoint: round trip, cheap metadata, refusal of mismatched, foreign,
future and malicious files. Every file lives under tmp_path."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

import segcore.models.checkpoint as ckpt
from segcore.models.checkpoint import (
    FORMAT_VERSION,
    ModelMeta,
    build_model,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from segcore.fsio import file_sha256
from segcore.errors import CheckpointError, NotFound, SegflowError
from segcore.models import create_model
from segcore.normalise import Normalisation

ARCH_KWARGS = {"base": 4, "depth": 2}


def _meta(**overrides: object) -> ModelMeta:
    fields = {
        "arch": "unet",
        "arch_kwargs": dict(ARCH_KWARGS),
        "class_names": ("background", "cell", "edge"),
        "in_channels": 1,
        "normalisation": Normalisation(mode="range", scale=255.0),
        "provenance": {"epochs": 3, "val_dice": 0.5},
    }
    fields.update(overrides)
    return ModelMeta(**fields)


def _trained_like_model(meta: ModelMeta) -> torch.nn.Module:
    """A model whose weights and BatchNorm statistics are all far from their initial values."""
    torch.manual_seed(0)
    model = build_model(meta)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t).abs() + 0.1)
            else:
                t.fill_(7)
    return model.eval()


class _OpensAFile:
    """Pickles to a call of builtins.open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (builtins.open, (self.marker, "w"))


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    meta = _meta()
    model = _trained_like_model(meta)
    path = save_checkpoint(tmp_path / "sub" / "m.safetensors", model, meta)
    assert path == tmp_path / "sub" / "m.safetensors" and path.is_file()
    loaded, meta2 = load_checkpoint(path)
    assert meta2 == meta
    assert not loaded.training
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2
        assert torch.equal(v1, v2), k1
    x = torch.randn(2, 1, 19, 23)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_save_leaves_no_temporary_file_and_replaces(tmp_path: Path) -> None:
    meta = _meta()
    save_checkpoint(tmp_path / "m.safetensors", _trained_like_model(meta), meta)
    other = build_model(meta)
    save_checkpoint(tmp_path / "m.safetensors", other, _meta(provenance={"second": True}))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    loaded, meta2 = load_checkpoint(tmp_path / "m.safetensors")
    assert meta2.provenance == {"second": True}
    assert torch.equal(loaded.head.weight, other.head.weight)


def test_a_checkpoint_gets_the_permissions_of_any_new_file(tmp_path: Path) -> None:
    """Not safetensors' 0600: a model is readable by whoever reads the run's other outputs."""
    meta = _meta()
    before = os.umask(0o027)  # this test's process only, restored below
    try:
        save_checkpoint(tmp_path / "m.safetensors", build_model(meta), meta)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o640


def test_read_meta_reads_no_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = _meta()
    path = save_checkpoint(tmp_path / "m.safetensors", _trained_like_model(meta), meta)

    def _no_tensors(*args: object, **kwargs: object) -> None:
        raise AssertionError("read_meta must not load tensors")

    monkeypatch.setattr(ckpt, "load_file", _no_tensors)
    got = read_meta(path)
    assert got == meta
    assert got.num_classes == 3
    assert got.kind == "semantic"
    assert got.format_version == FORMAT_VERSION
    assert got.normalisation.mode == "range"
    with pytest.raises(AssertionError, match="must not load tensors"):  # the patch is effective
        load_checkpoint(path)


def test_weights_of_another_width_are_refused(tmp_path: Path) -> None:
    saved = create_model("unet", in_channels=1, num_classes=3, base=8, depth=2)
    path = save_checkpoint(tmp_path / "m.safetensors", saved, _meta(arch_kwargs={"base": 16, "depth": 2}))
    with pytest.raises(CheckpointError, match="do not fit architecture 'unet'") as info:
        load_checkpoint(path)
    assert "base" in str(info.value)


def test_weights_with_other_class_count_are_refused(tmp_path: Path) -> None:
    saved = create_model("unet", in_channels=1, num_classes=2, **ARCH_KWARGS)
    path = save_checkpoint(tmp_path / "m.safetensors", saved, _meta())  # meta names 3 classes
    with pytest.raises(CheckpointError, match="'unet'"):
        load_checkpoint(path)


def test_missing_or_extra_keys_are_refused(tmp_path: Path) -> None:
    saved = create_model("unet", in_channels=1, num_classes=3, base=4, depth=3)
    path = save_checkpoint(tmp_path / "m.safetensors", saved, _meta())  # meta: depth 2
    with pytest.raises(CheckpointError, match="do not fit architecture 'unet'"):
        load_checkpoint(path)


@pytest.mark.parametrize("change", ["drop", "add"])
def test_key_set_must_match_exactly(tmp_path: Path, change: str) -> None:
    meta = _meta()
    state = {k: v.contiguous() for k, v in build_model(meta).state_dict().items()}
    if change == "drop":
        state.pop("head.bias")
    else:
        state["head.extra"] = torch.zeros(3)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={"segflow": meta.model_dump_json()})
    with pytest.raises(CheckpointError, match="head"):
        load_checkpoint(path)


def test_unknown_architecture_is_checkpoint_error(tmp_path: Path) -> None:
    meta = _meta()
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(meta), meta.model_copy(update={"arch": "nope"}))
    with pytest.raises(CheckpointError, match="'nope'"):
        load_checkpoint(path)


def test_invalid_arch_values_are_checkpoint_error(tmp_path: Path) -> None:
    meta = _meta()
    bad = meta.model_copy(update={"arch_kwargs": {"base": 0, "depth": 2}})
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(meta), bad)
    with pytest.raises(CheckpointError, match="cannot build architecture 'unet'"):
        load_checkpoint(path)


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    for fn in (read_meta, load_checkpoint):
        with pytest.raises(NotFound, match="does not exist") as info:
            fn(tmp_path / "absent.safetensors")
        assert isinstance(info.value, FileNotFoundError)
        assert isinstance(info.value, SegflowError)


def test_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        read_meta(tmp_path)


def test_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no segflow metadata"):
        read_meta(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_safetensors_without_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="no segflow metadata"):
        load_checkpoint(path)


@pytest.mark.parametrize("payload", ["{not json", json.dumps({"arch": "unet"}), json.dumps([1, 2])])
def test_invalid_metadata_is_refused(tmp_path: Path, payload: str) -> None:
    path = tmp_path / "bad-meta.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"segflow": payload})
    with pytest.raises(CheckpointError, match="invalid"):
        read_meta(path)


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint", b"\xff" * 64])
def test_garbage_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a segflow checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt"])
def test_pickle_payload_is_never_executed(tmp_path: Path, name: str) -> None:
    # Control: the payload really runs code when unpickled by torch.load(weights_only=False).
    control_marker = tmp_path / "control-marker"
    control = tmp_path / "control.pt"
    torch.save({"state_dict": _OpensAFile(control_marker)}, control)
    assert not control_marker.exists()
    handle = torch.load(control, weights_only=False)
    handle["state_dict"].close()
    assert control_marker.exists()

    marker = tmp_path / "marker"
    path = tmp_path / name
    torch.save({"state_dict": _OpensAFile(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        read_meta(path)
    assert not marker.exists()


def test_future_format_version_is_refused(tmp_path: Path) -> None:
    meta = _meta()
    future = meta.model_copy(update={"format_version": FORMAT_VERSION + 1})
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(meta), future)
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}.*Upgrade segflow"):
        read_meta(path)
    with pytest.raises(CheckpointError, match="Upgrade"):
        load_checkpoint(path)


def test_a_version_2_record_reads_with_every_foreground_region_kept() -> None:
    from segcore.models.checkpoint import parse_meta

    older = {"format_version": 2, "arch": "unet", "arch_kwargs": {"base": 4, "depth": 2}, "class_names": ["bg", "fg"],
             "in_channels": 1, "output": {"rule": "argmax", "threshold": 0.5, "steps": []}}
    meta = parse_meta(json.dumps(older), where="older.safetensors")
    assert meta.format_version == 2 and not meta.output.largest_region


def test_meta_is_frozen_and_strict() -> None:
    meta = _meta()
    with pytest.raises(ValidationError):
        meta.arch = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        ModelMeta(arch="unet", class_names=("bg", "fg"), in_channels=1, unexpected=1)
    assert ModelMeta(arch="unet", class_names=("bg", "fg"), in_channels=1).normalisation == Normalisation()


def test_build_model_takes_channels_and_classes_from_meta() -> None:
    model = build_model(_meta(in_channels=3, class_names=("a", "b", "c", "d", "e")))
    assert (model.in_channels, model.num_classes) == (3, 5)


@pytest.mark.parametrize("size", [0, 5, (1 << 20) + 3])
def test_file_sha256_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_a_volumetric_checkpoint_records_its_axes_and_they_must_fit_the_architecture(tmp_path: Path) -> None:
    meta = _meta(arch="unet3d", input_axes="bczyx")
    assert meta.spatial_dims == 3 and _meta().spatial_dims == 2
    path = save_checkpoint(tmp_path / "v.safetensors", _trained_like_model(meta), meta)
    assert read_meta(path).input_axes == "bczyx"
    loaded, _ = load_checkpoint(path)
    assert loaded.spatial_dims == 3
    for arch, axes in (("unet3d", "bcyx"), ("unet", "bczyx")):
        with pytest.raises(CheckpointError, match=f"architecture '{arch}' takes .-D inputs"):
            build_model(_meta(arch=arch, input_axes=axes))
