"""Tests of the synthetic demo collection."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segcore.errors import ConfigError
from segcore.synthetic import CLASS_NAMES, generate_collection, make_sample


def _samples(n: int, *, size: int = 64, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size=size) for _ in range(n)]


def test_class_names_have_background_and_two_foreground_classes():
    assert CLASS_NAMES[0] == "background"
    assert len(CLASS_NAMES) >= 3
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)


@pytest.mark.parametrize("size", [32, 64, 100])
def test_make_sample_shapes_and_dtypes(size):
    image, classes = make_sample(np.random.default_rng(3), size=size)
    assert image.shape == classes.shape == (size, size)
    assert image.dtype == np.uint8
    assert classes.dtype == np.uint8
    assert int(classes.max()) < len(CLASS_NAMES)


def test_make_sample_is_a_function_of_the_generator_state():
    a = make_sample(np.random.default_rng(7), size=64)
    b = make_sample(np.random.default_rng(7), size=64)
    c = make_sample(np.random.default_rng(8), size=64)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_every_foreground_class_is_visible_in_every_image():
    for _, classes in _samples(20):
        counts = np.bincount(classes.ravel(), minlength=len(CLASS_NAMES))
        assert (counts[1:] >= 0.01 * classes.size).all(), counts


def test_objects_are_brighter_than_background_but_classes_share_a_mean():
    pairs = _samples(20)
    images = np.concatenate([im.ravel() for im, _ in pairs]).astype(float)
    classes = np.concatenate([cl.ravel() for _, cl in pairs])
    means = [images[classes == c].mean() for c in range(len(CLASS_NAMES))]
    assert means[1] > means[0] + 60 and means[2] > means[0] + 60
    # Not separable by intensity alone: the foreground means are close...
    assert abs(means[1] - means[2]) < 15
    # ...and the textured class has the wider spread.
    assert images[classes == 2].std() > 1.4 * images[classes == 1].std()


def test_objects_cross_the_image_border():
    for _, classes in _samples(20):
        rim = np.concatenate([classes[0], classes[-1], classes[:, 0], classes[:, -1]])
        assert (rim > 0).any()


def test_objects_of_different_classes_touch():
    touching = 0
    for _, classes in _samples(20):
        right = (classes[:, :-1] > 0) & (classes[:, 1:] > 0) & (classes[:, :-1] != classes[:, 1:])
        down = (classes[:-1] > 0) & (classes[1:] > 0) & (classes[:-1] != classes[1:])
        touching += bool(right.any() or down.any())
    assert touching >= 10


def test_image_matches_class_map_where_drawn():
    """Foreground pixels are bright, background pixels mostly dark: the map is what was drawn."""
    for image, classes in _samples(10):
        fg, bg = image[classes > 0].astype(float), image[classes == 0].astype(float)
        assert np.median(fg) > np.percentile(bg, 95)


def test_generate_collection_writes_matching_files(tmp_path):
    ids = generate_collection(tmp_path / "coll", n_images=4, size=48, seed=5)
    assert ids == [f"img-{i:05d}" for i in range(4)]
    assert sorted(p.stem for p in (tmp_path / "coll" / "images").iterdir()) == ids
    assert sorted(p.stem for p in (tmp_path / "coll" / "masks").iterdir()) == ids
    for image_id in ids:
        image = np.asarray(Image.open(tmp_path / "coll" / "images" / f"{image_id}.png"))
        mask = np.asarray(Image.open(tmp_path / "coll" / "masks" / f"{image_id}.png"))
        assert image.shape == mask.shape == (48, 48)
        assert image.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) <= set(range(len(CLASS_NAMES)))


def test_generate_collection_is_deterministic_and_prefix_stable(tmp_path):
    generate_collection(tmp_path / "a", n_images=3, size=40, seed=1)
    generate_collection(tmp_path / "b", n_images=5, size=40, seed=1)
    generate_collection(tmp_path / "c", n_images=3, size=40, seed=2)
    for kind in ("images", "masks"):
        for i in range(3):
            name = f"img-{i:05d}.png"
            assert (tmp_path / "a" / kind / name).read_bytes() == (tmp_path / "b" / kind / name).read_bytes()
    first = "images/img-00000.png"
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "c" / first).read_bytes()


@pytest.mark.parametrize("kwargs", [{"size": 16}, {"size": 64.5}, {"n_images": 0}])
def test_generate_collection_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        generate_collection(tmp_path / "bad", **kwargs)
