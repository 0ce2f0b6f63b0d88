"""Tests for segcore.collection.volumes: NIfTI and TIFF z-stacks probed and read slab by slab."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tifffile
import zarr

from segcore.collection.imageio import file_suffix, without_suffix
from segcore.collection.listing import image_id_for, list_sources
from segcore.collection.volumes import probe_volume, read_mask_slab, read_volume_slab, slice_id
from segcore.errors import ImageReadError, NotFound
from segcore.fsio import file_sha256, signature

nib = pytest.importorskip("nibabel")


def _volume(shape=(7, 5, 6), dtype=np.int16, seed=0):
    """``(D, H, W)`` random voxels."""
    return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(dtype)


def _save_nifti(path, zyx: np.ndarray, affine=None, **header):
    """Save ``(D, H, W)`` voxels as NIfTI with slice k = data[:, :, k]."""
    affine = np.diag([0.8, 0.7, 2.5, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(np.moveaxis(zyx, 0, -1), affine)
    for k, v in header.items():
        img.header[k] = v
    nib.save(img, str(path))
    return img


def test_suffixes_and_ids_count_nii_gz_as_one_suffix(tmp_path):
    assert file_suffix("a/CT.NII.GZ") == ".nii.gz" and file_suffix("b.nii") == ".nii"
    assert file_suffix("c.tar.gz") == ".gz" and file_suffix("x.ome.tif") == ".tif"
    assert without_suffix("sub/ct.nii.gz") == "sub/ct" and without_suffix("a.ome.tif") == "a.ome"
    (tmp_path / "sub").mkdir()
    for name in ("sub/ct.nii.gz", "mr.nii", "notes.gz"):
        (tmp_path / name).write_bytes(b"x")
    assert image_id_for(tmp_path / "sub" / "ct.nii.gz", tmp_path) == "sub/ct"
    assert image_id_for(tmp_path / "mr.nii") == "mr"
    listing = list_sources(tmp_path)
    assert [p.name for p in listing.files] == ["mr.nii"] and [p.name for p in listing.skipped] == ["notes.gz"]
    assert slice_id("ct", 7, 96) == "ct/z0007" and slice_id("ct", 3, 12000) == "ct/z00003"


def test_nifti_probe_and_slabs_keep_voxels_spacing_and_affine(tmp_path):
    zyx = _volume()
    affine = np.array([[0.8, 0, 0, -50.5], [0, 0.7, 0, 12.25], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
    _save_nifti(tmp_path / "v.nii.gz", zyx, affine)
    info = probe_volume(tmp_path / "v.nii.gz")
    assert (info.depth, info.height, info.width, info.channels, info.dtype) == (7, 5, 6, 1, "int16")
    assert info.spacing == pytest.approx((2.5, 0.8, 0.7)) and info.format == "nifti"
    np.testing.assert_array_equal(np.asarray(info.affine), affine.astype(np.float32))
    fields = info.manifest_fields()
    assert fields["depth"] == 7 and np.allclose(json.loads(fields["affine"]), affine)
    slab = read_volume_slab(tmp_path / "v.nii.gz", 2, 5)
    assert slab.shape == (3, 5, 6, 1) and slab.dtype == np.int16
    np.testing.assert_array_equal(slab[..., 0], zyx[2:5])


def test_scaled_nifti_is_read_scaled_as_float32(tmp_path):
    zyx = _volume(dtype=np.int16)
    nib.save(nib.Nifti1Image(np.moveaxis(zyx, 0, -1), np.eye(4)), str(tmp_path / "s.nii"))
    raw = bytearray((tmp_path / "s.nii").read_bytes())  # nibabel rescales arrays it saves: set the header's
    raw[112:120] = struct.pack("<ff", 2.0, -1024.0)  # scl_slope and scl_inter (bytes 112-119) by hand
    (tmp_path / "s.nii").write_bytes(bytes(raw))
    info = probe_volume(tmp_path / "s.nii")
    assert info.dtype == "float32"
    slab = read_volume_slab(tmp_path / "s.nii", 0, 7)
    np.testing.assert_allclose(slab[..., 0], zyx.astype(np.float32) * 2 - 1024)


def test_nifti_masks_are_labels_and_bad_labels_are_refused(tmp_path):
    labels = np.random.default_rng(1).integers(0, 3, (4, 5, 6)).astype(np.uint8)
    _save_nifti(tmp_path / "m.nii.gz", labels)
    np.testing.assert_array_equal(read_mask_slab(tmp_path / "m.nii.gz", 1, 3), labels[1:3])
    _save_nifti(tmp_path / "neg.nii.gz", labels.astype(np.int16) - 1)
    with pytest.raises(ImageReadError, match="negative values"):
        read_mask_slab(tmp_path / "neg.nii.gz", 0, 4)


def test_ome_tiff_z_stack_with_physical_sizes(tmp_path):
    zyx = _volume(dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.ome.tif", zyx,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 2.0})
    info = probe_volume(tmp_path / "s.ome.tif")
    assert (info.depth, info.height, info.width, info.dtype) == (7, 5, 6, "uint16")
    assert info.spacing == (2.0, 0.4, 0.3) and info.unit == "micrometer" and info.affine is None
    np.testing.assert_array_equal(read_volume_slab(tmp_path / "s.ome.tif", 3, 7)[..., 0], zyx[3:])


def test_imagej_stack_spacing_and_channel_axis(tmp_path):
    zcyx = np.random.default_rng(2).integers(0, 255, (4, 2, 5, 6)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", zcyx, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"axes": "ZCYX", "spacing": 3.0, "unit": "um"})
    info = probe_volume(tmp_path / "c.tif")
    assert (info.depth, info.height, info.width, info.channels) == (4, 5, 6, 2)
    assert info.spacing == pytest.approx((3.0, 0.25, 0.5)) and info.unit == "micrometer"
    slab = read_volume_slab(tmp_path / "c.tif", 1, 3)
    np.testing.assert_array_equal(slab, np.moveaxis(zcyx[1:3], 1, -1))


def test_plain_page_stack_is_a_volume_and_2d_tiffs_are_not(tmp_path):
    pages = _volume(dtype=np.uint8)
    tifffile.imwrite(tmp_path / "p.tif", pages, photometric="minisblack")  # axes QYX
    assert probe_volume(tmp_path / "p.tif").depth == 7
    np.testing.assert_array_equal(read_volume_slab(tmp_path / "p.tif", 6, 7)[0, ..., 0], pages[6])
    tifffile.imwrite(tmp_path / "flat.tif", pages[0])
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((5, 6, 3), np.uint8), photometric="rgb")
    assert probe_volume(tmp_path / "flat.tif") is None and probe_volume(tmp_path / "rgb.tif") is None
    with pytest.raises(ImageReadError, match="it is a 2-D image"):
        read_volume_slab(tmp_path / "flat.tif", 0, 1)


def test_bad_volumes_are_refused_naming_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((2, 3, 5, 6), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(ImageReadError, match="split time series"):
        probe_volume(tmp_path / "t.tif")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(ImageReadError, match="junk.nii.gz"):
        probe_volume(tmp_path / "junk.nii.gz")
    (tmp_path / "empty.nii").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        probe_volume(tmp_path / "empty.nii")
    with pytest.raises(NotFound):
        probe_volume(tmp_path / "missing.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 7), np.uint8), np.eye(4)), str(tmp_path / "t4.nii"))
    with pytest.raises(ImageReadError, match="time series"):
        probe_volume(tmp_path / "t4.nii")
    _save_nifti(tmp_path / "v.nii", _volume())
    with pytest.raises(ImageReadError, match=r"slices \[5, 9\)"):
        read_volume_slab(tmp_path / "v.nii", 5, 9)


def _ome_zarr(path, data, axes, scale, unit="micrometer"):
    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1,) * (data.ndim - 2) + data.shape[-2:])[:] = data
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": a, "type": "channel" if a == "c" else ("time" if a == "t" else "space"),
                  **({"unit": unit} if a in "zyx" else {})} for a in axes],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}]}]}


def test_ome_zarr_images_are_read_in_place_with_their_axes_and_scale(tmp_path):
    czyx = np.random.default_rng(4).integers(0, 4000, (2, 5, 6, 7)).astype(np.uint16)
    _ome_zarr(tmp_path / "img.zarr", czyx, "czyx", (1.0, 2.0, 0.5, 0.25))
    info = probe_volume(tmp_path / "img.zarr")
    assert (info.depth, info.height, info.width, info.channels, info.dtype) == (5, 6, 7, 2, "uint16")
    assert info.spacing == (2.0, 0.5, 0.25) and info.unit == "micrometer" and info.format == "zarr"
    np.testing.assert_array_equal(read_volume_slab(tmp_path / "img.zarr", 1, 4), np.moveaxis(czyx[:, 1:4], 0, -1))
    _ome_zarr(tmp_path / "t.zarr", czyx[:, :2, None].astype(np.uint16), "tczyx", (1, 1, 1, 1, 1))  # 2 time points
    with pytest.raises(ImageReadError, match="2 time points"):
        probe_volume(tmp_path / "t.zarr")
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w")
    with pytest.raises(ImageReadError, match="without OME-Zarr 'multiscales'"):
        probe_volume(tmp_path / "bare.zarr")


def test_plain_zarr_arrays_v2_and_v3_and_2d(tmp_path):
    zyx = _volume(dtype=np.int16)
    v2 = zarr.open_array(str(tmp_path / "v2.zarr"), mode="w", shape=zyx.shape, dtype=zyx.dtype, zarr_format=2)
    v2[:] = zyx
    assert probe_volume(tmp_path / "v2.zarr").depth == 7
    np.testing.assert_array_equal(read_volume_slab(tmp_path / "v2.zarr", 0, 7)[..., 0], zyx)
    named = zarr.open_array(str(tmp_path / "yxz.zarr"), mode="w", shape=(5, 6, 7), dtype="uint8",
                            dimension_names=("y", "x", "z"))
    named[:] = np.moveaxis(zyx, 0, -1).astype(np.uint8)
    np.testing.assert_array_equal(read_volume_slab(tmp_path / "yxz.zarr", 2, 3)[0, ..., 0], zyx[2].astype(np.uint8))
    flat = zarr.open_array(str(tmp_path / "flat.zarr"), mode="w", shape=(5, 6), dtype="float32")
    flat[:] = zyx[0]
    info = probe_volume(tmp_path / "flat.zarr")
    assert (info.depth, info.height, info.width) == (1, 5, 6)
    np.testing.assert_array_equal(read_volume_slab(tmp_path / "flat.zarr", 0, 1)[0, ..., 0], zyx[0])


def test_zarr_directories_are_listed_hashed_and_stamped_as_one_source(tmp_path):
    arr = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=(4, 5, 6), dtype="uint8", chunks=(1, 5, 6))
    arr[:] = 1
    (tmp_path / "empty.zarr").mkdir()
    listing = list_sources(tmp_path)
    assert [p.name for p in listing.files] == ["a.zarr"]
    assert [(p.name, "without Zarr metadata" in why) for p, why in listing.problems] == [("empty.zarr", True)]
    assert image_id_for(tmp_path / "a.zarr", tmp_path) == "a"
    before, stamp = file_sha256(tmp_path / "a.zarr"), signature(tmp_path / "a.zarr")
    assert before == file_sha256(tmp_path / "a.zarr")
    arr[2] = 7  # one chunk rewritten in place
    assert file_sha256(tmp_path / "a.zarr") != before and signature(tmp_path / "a.zarr") != stamp


def test_a_mask_volume_on_another_voxel_grid_is_refused_and_identity_or_shifted_affines_are_kept(tmp_path):
    """A viewer may save a label volume in another orientation (same shape, axes flipped or swapped,
    overlaying the image in world space): scored voxel by voxel it would miss everything. It is an
    unusable mask; a mask written without orientation (identity affine) or with another origin is not."""
    from segcore.collection.sources import pair_sources, probe_sources

    affine = np.array([[-0.8, 0, 0, 120.0], [0, 0.8, 0, -99.0], [0, 0, 2.5, -310.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).integers(0, 100, (12, 10, 4)).astype(np.int16)
    labels = (data > 50).astype(np.uint8)
    flipped = affine @ np.array([[-1, 0, 0, 11], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # i reversed
    masks = {"flip": (labels[::-1], flipped), "plain": (labels, np.eye(4)),
             "shifted": (labels, affine + np.array([[0, 0, 0, 0.5]] * 3 + [[0, 0, 0, 0]]))}
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    for name, (lab, aff) in masks.items():
        nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "img" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(np.ascontiguousarray(lab), aff), str(tmp_path / "gt" / f"{name}.nii.gz"))
    rows = probe_sources(pair_sources(str(tmp_path / "img"), str(tmp_path / "gt")))
    status = {r["volume_id"]: (r["mask_status"], r["mask_error"]) for r in rows}
    assert status["plain"] == ("ok", None) and status["shifted"] == ("ok", None)
    assert status["flip"][0] == "error" and "oriented RAS, the volume's LAS" in status["flip"][1]
    assert "Reorient or resample the mask onto the image's voxel grid" in status["flip"][1]
