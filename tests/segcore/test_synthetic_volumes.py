"""Tests of the synthetic volume collection (segcore.synthetic_volumes)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from segcore.errors import ConfigError
from segcore.synthetic_volumes import (
    BOX_SHARE,
    VOLUME_CLASS_NAMES,
    generate_volume_collection,
    local_coords_3d,
    make_volume_sample,
    random_rotation,
)

SHAPE = (16, 32, 32)


def _samples(n: int, *, shape: tuple[int, int, int] = (24, 40, 40), seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    return [make_volume_sample(rng, shape=shape) for _ in range(n)]


@pytest.fixture(scope="module")
def samples():
    return _samples(10)


def test_class_names_are_background_ellipsoid_box():
    assert VOLUME_CLASS_NAMES == ("background", "ellipsoid", "box")


@pytest.mark.parametrize("shape", [(16, 16, 16), (17, 33, 20), (32, 64, 64)])
def test_sample_shapes_and_dtypes(shape):
    volume, labels = make_volume_sample(np.random.default_rng(3), shape=shape)
    assert volume.shape == labels.shape == shape
    assert volume.dtype == labels.dtype == np.uint8
    assert int(labels.max()) < len(VOLUME_CLASS_NAMES)


def test_samples_are_a_function_of_the_generator_state():
    a, b, c = (make_volume_sample(np.random.default_rng(s), shape=SHAPE) for s in (7, 7, 8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_every_foreground_class_is_visible_in_every_volume(samples):
    for _, labels in samples:
        counts = np.bincount(labels.ravel(), minlength=len(VOLUME_CLASS_NAMES))
        assert (counts[1:] >= 0.01 * labels.size).all(), counts


def test_classes_share_a_mean_and_are_told_apart_by_texture(samples):
    volumes = np.concatenate([v.ravel() for v, _ in samples]).astype(float)
    labels = np.concatenate([lab.ravel() for _, lab in samples])
    means = [volumes[labels == c].mean() for c in range(len(VOLUME_CLASS_NAMES))]
    assert means[1] > means[0] + 60 and means[2] > means[0] + 60
    assert abs(means[1] - means[2]) < 15
    assert volumes[labels == 2].std() > 1.4 * volumes[labels == 1].std()


def test_objects_cross_the_border_and_classes_touch(samples):
    touching = 0
    for _, labels in samples:
        faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
        assert any((f > 0).any() for f in faces)
        contact = False
        for axis in range(3):
            a, b = np.moveaxis(labels, axis, 0)[:-1], np.moveaxis(labels, axis, 0)[1:]
            contact |= bool(((a > 0) & (b > 0) & (a != b)).any())
        touching += contact
    assert touching >= len(samples) // 2


def test_volume_matches_class_map_where_drawn(samples):
    for volume, labels in samples:
        fg, bg = volume[labels > 0].astype(float), volume[labels == 0].astype(float)
        assert np.median(fg) > np.percentile(bg, 95)


def test_rotations_are_proper_and_local_coordinates_follow_them():
    rotation = random_rotation(np.random.default_rng(0))
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    u = local_coords_3d((2, 3, 4), np.array([1.0, 1.0, 1.0]), np.eye(3), origin=(5, 0, 0))
    assert u.shape == (3, 2, 3, 4)
    assert u[:, 0, 2, 3].tolist() == [4.0, 1.0, 2.0]  # voxel (5, 2, 3) minus centre (1, 1, 1)
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # frame axes: y, z, -x
    v = local_coords_3d((2, 3, 4), np.zeros(3), swap)
    assert v[:, 1, 2, 3].tolist() == [2.0, 1.0, -3.0]
    assert BOX_SHARE ** 3 * 8 == pytest.approx(4 * np.pi / 3)  # a box holds what an ellipsoid holds


@pytest.mark.parametrize("shape", [(15, 32, 32), (16, 32), (16.5, 32, 32)])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ConfigError, match="shape"):
        make_volume_sample(np.random.default_rng(0), shape=shape)


def _read(path) -> np.ndarray:
    """``(D, H, W)`` array of a written NIfTI (stored as x, y, z) or TIFF (stored as z, y, x)."""
    if path.name.endswith(".nii.gz"):
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)
    return tifffile.imread(path)


@pytest.mark.parametrize("file_format", ["tiff", "nifti"])
def test_collection_files_hold_the_samples(tmp_path, file_format):
    if file_format == "nifti":
        pytest.importorskip("nibabel")
    ids = generate_volume_collection(tmp_path / "coll", n_volumes=3, shape=SHAPE, seed=5, file_format=file_format)
    assert ids == ["vol-00000", "vol-00001", "vol-00002"]
    suffix = {"tiff": ".tif", "nifti": ".nii.gz"}[file_format]
    for kind in ("images", "masks"):
        assert sorted(p.name for p in (tmp_path / "coll" / kind).iterdir()) == [f"{i}{suffix}" for i in ids]
    streams = np.random.SeedSequence(5).spawn(3)
    for volume_id, stream in zip(ids, streams):
        volume, labels = make_volume_sample(np.random.default_rng(stream), shape=SHAPE)
        got_volume = _read(tmp_path / "coll" / "images" / f"{volume_id}{suffix}")
        got_labels = _read(tmp_path / "coll" / "masks" / f"{volume_id}{suffix}")
        assert got_volume.dtype == got_labels.dtype == np.uint8
        np.testing.assert_array_equal(got_volume, volume)
        np.testing.assert_array_equal(got_labels, labels)


def test_nifti_records_isotropic_millimetre_voxels(tmp_path):
    nib = pytest.importorskip("nibabel")
    generate_volume_collection(tmp_path, n_volumes=1, shape=(16, 20, 24), seed=0, file_format="auto")
    image = nib.load(str(tmp_path / "images" / "vol-00000.nii.gz"))
    assert image.shape == (24, 20, 16)  # x, y, z
    assert image.header.get_zooms() == (1.0, 1.0, 1.0) and image.header.get_xyzt_units()[0] == "mm"


def test_collection_is_prefix_stable(tmp_path):
    generate_volume_collection(tmp_path / "a", n_volumes=2, shape=SHAPE, seed=1, file_format="tiff")
    generate_volume_collection(tmp_path / "b", n_volumes=3, shape=SHAPE, seed=1, file_format="tiff")
    for kind in ("images", "masks"):
        np.testing.assert_array_equal(_read(tmp_path / "a" / kind / "vol-00001.tif"),
                                      _read(tmp_path / "b" / kind / "vol-00001.tif"))


@pytest.mark.parametrize("kwargs", [{"n_volumes": 0}, {"shape": (8, 32, 32)}, {"file_format": "mha"}])
def test_collection_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        generate_volume_collection(tmp_path / "bad", **{"n_volumes": 1, **kwargs})
