"""Tests for segcore.collection.dicom: a folder of .dcm files is one volume, slices sorted by position."""

from __future__ import annotations

import numpy as np
import pytest

from segcore.collection.listing import image_id_for, list_sources
from segcore.collection.volumes import is_volume_candidate, probe_volume, read_volume_slab
from segcore.errors import ImageReadError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

#: An oblique-free axial series: rows run along +y (posterior), columns along +x (left).
ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def write_series(folder, hu: np.ndarray, *, spacing=(0.5, 0.75), z0=-100.0, dz=2.5, order=None, series_uid=None,
                 slope=1.0, intercept=-1024.0):
    """Write ``(D, H, W)`` Hounsfield units as a CT series, one file per slice, in ``order`` of file names."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    order = list(range(len(hu))) if order is None else order
    for name_index, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"im{name_index:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = series_uid, "CT", z + 1
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelSpacing = list(spacing)
        ds.ImageOrientationPatient = ORIENTATION
        ds.ImagePositionPatient = [-30.0, 20.0, z0 + dz * z]
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.round((hu[z] - intercept) / slope).astype(np.int16).tobytes()
        ds.save_as(folder / f"im{name_index:03d}.dcm", enforce_file_format=True)


def test_a_series_is_sorted_by_position_rescaled_and_placed(tmp_path):
    hu = np.random.default_rng(0).integers(-1000, 1500, (5, 6, 7)).astype(np.float32)
    write_series(tmp_path / "case.01", hu, order=[3, 0, 4, 1, 2])  # file names do not follow the slices
    (tmp_path / "notes.txt").write_text("not a series")
    assert is_volume_candidate(tmp_path / "case.01")
    assert [p.name for p in list_sources(tmp_path).files] == ["case.01"]
    assert image_id_for(tmp_path / "case.01", tmp_path) == "case.01"
    info = probe_volume(tmp_path / "case.01")
    assert (info.depth, info.height, info.width, info.dtype, info.format) == (5, 6, 7, "float32", "dicom")
    assert info.spacing == (2.5, 0.5, 0.75) and info.unit == "millimeter"
    np.testing.assert_array_equal(read_volume_slab(tmp_path / "case.01", 0, 5)[..., 0], hu)
    np.testing.assert_array_equal(read_volume_slab(tmp_path / "case.01", 3, 5)[..., 0], hu[3:])
    # voxel (row r, column c, slice k) -> RAS: x = -(-30 + 0.75 c), y = -(20 + 0.5 r), z = -100 + 2.5 k
    affine = np.asarray(info.affine)
    np.testing.assert_allclose(affine @ [2, 3, 4, 1], [-(-30 + 0.75 * 3), -(20 + 0.5 * 2), -100 + 2.5 * 4, 1])


def test_unscaled_series_keep_their_integers(tmp_path):
    raw = np.random.default_rng(1).integers(-500, 500, (3, 4, 4)).astype(np.float32)
    write_series(tmp_path / "s", raw, slope=1.0, intercept=0.0)
    assert probe_volume(tmp_path / "s").dtype == "int16"
    np.testing.assert_array_equal(read_volume_slab(tmp_path / "s", 0, 3)[..., 0], raw.astype(np.int16))


def test_two_series_in_one_folder_and_broken_files_are_refused(tmp_path):
    hu = np.zeros((2, 4, 4), np.float32)
    write_series(tmp_path / "mixed", hu)
    write_series(tmp_path / "other", hu)
    (tmp_path / "other" / "im000.dcm").rename(tmp_path / "mixed" / "zz.dcm")
    with pytest.raises(ImageReadError, match="2 DICOM series; put each series in a folder"):
        probe_volume(tmp_path / "mixed")
    (tmp_path / "other" / "broken.dcm").write_bytes(b"not dicom")
    with pytest.raises(ImageReadError, match="broken.dcm"):
        probe_volume(tmp_path / "other")
