"""Tests of the synthetic demo collection."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import distance_transform_edt

from segcore.errors import ConfigError
from segcore.collection.imageio import read_mask
from segcore.synthetic import (
    CLASS_NAMES,
    INSTANCE_CLASS_NAMES,
    generate_collection,
    generate_instance_collection,
    make_instance_sample,
    make_sample,
)


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


@pytest.mark.parametrize("make", [make_sample, make_instance_sample])
def test_samples_are_a_function_of_the_generator_state(make):
    a = make(np.random.default_rng(7), size=64)
    b = make(np.random.default_rng(7), size=64)
    c = make(np.random.default_rng(8), size=64)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


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


# --------------------------------------------------------------------------------------------
# instance samples


def _instance_samples(n: int, *, size: int = 128, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_instance_sample(rng, size=size) for _ in range(n)]


def _touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different object ids that are 4-neighbours somewhere."""
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        both = (a > 0) & (b > 0) & (a != b)
        pairs |= {(min(x, y), max(x, y)) for x, y in zip(a[both].tolist(), b[both].tolist())}
    return pairs


def test_instance_class_names_are_background_and_nucleus():
    assert INSTANCE_CLASS_NAMES == ("background", "nucleus")


@pytest.mark.parametrize("size", [32, 64, 128])
def test_instance_sample_shapes_dtypes_and_consecutive_ids(size):
    for image, labels in _instance_samples(5, size=size, seed=size):
        assert image.shape == labels.shape == (size, size)
        assert image.dtype == np.uint8 and labels.dtype == np.uint16
        k = int(labels.max())
        assert k >= 1
        np.testing.assert_array_equal(np.unique(labels), np.arange(k + 1))  # 0 and 1..K, no gaps


def test_instance_sample_holds_5_to_20_objects_at_128_px_and_none_is_a_sliver():
    counts = []
    for _, labels in _instance_samples(30):
        areas = np.bincount(labels.ravel())[1:]
        assert areas.min() >= 12
        counts.append(areas.size)
    assert min(counts) >= 2 and max(counts) <= 20
    assert np.median(counts) >= 8


def test_instance_samples_have_touching_objects_and_objects_cut_by_the_border():
    samples = _instance_samples(20)
    touching = [len(_touching_pairs(labels)) for _, labels in samples]
    assert sum(t > 0 for t in touching) >= 15
    assert sum(touching) >= 40  # several per image on average
    for _, labels in samples:
        rim = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        assert (rim > 0).any()


def test_instance_labels_match_the_drawn_image():
    for image, labels in _instance_samples(10):
        fg, bg = image[labels > 0].astype(float), image[labels == 0].astype(float)
        assert np.median(fg) > np.percentile(bg, 95)
        for obj in range(1, int(labels.max()) + 1):
            assert image[labels == obj].mean() > np.median(bg) + 40


def test_instances_are_brighter_at_their_core_than_at_their_rim():
    """The dome profile: what tells touching nuclei apart in the image, as in real data."""
    differences = []
    for image, labels in _instance_samples(10):
        for obj in range(1, int(labels.max()) + 1):
            depth = distance_transform_edt(labels == obj)
            core, rim = depth >= 4, depth == 1
            if core.any():
                differences.append(image[core].mean() - image[rim].mean())
    assert len(differences) >= 50
    assert np.mean(differences) > 15


def test_generate_instance_collection_writes_16_bit_instance_masks(tmp_path):
    ids = generate_instance_collection(tmp_path / "coll", n_images=3, size=48, seed=2)
    assert ids == [f"img-{i:05d}" for i in range(3)]
    rng_streams = np.random.SeedSequence(2).spawn(3)
    for image_id, stream in zip(ids, rng_streams):
        image = np.asarray(Image.open(tmp_path / "coll" / "images" / f"{image_id}.png"))
        mask = read_mask(tmp_path / "coll" / "masks" / f"{image_id}.png")
        expected_image, expected_labels = make_instance_sample(np.random.default_rng(stream), size=48)
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(mask, expected_labels)
        assert mask.dtype == np.uint16


def _areas_and_counts(scale) -> tuple[np.ndarray, float]:
    """Areas of every nucleus of 30 samples at ``scale`` (128 px), and the mean count per image."""
    found, counts = [], []
    for stream in np.random.SeedSequence(3).spawn(30):
        labels = make_instance_sample(np.random.default_rng(stream), size=128, scale=scale)[1]
        per = np.bincount(labels.ravel())[1:]
        found += per.tolist()
        counts.append(per.size)
    return np.asarray(found), float(np.mean(counts))


def test_scale_enlarges_the_nuclei_and_thins_them_out() -> None:
    (areas1, count1), (areas2, count2) = _areas_and_counts(1.0), _areas_and_counts(2.0)
    assert 3.0 < np.median(areas2) / np.median(areas1) < 5.0  # semi-axes doubled: about four times the area
    assert 0.35 < count2 / count1 < 0.65  # half as many nuclei per image


def test_a_range_of_scales_mixes_small_and_large_nuclei() -> None:
    areas = _areas_and_counts
    (one, count1), (two, count2), (mixed, count_mixed) = areas(1.0), areas(2.0), areas((1.0, 2.0))
    # Each nucleus draws its own size: the range's median lies between the ends' medians, and its
    # small and large quantiles reach towards those of scale 1 and scale 2.
    assert np.median(one) < np.median(mixed) < np.median(two)
    assert np.percentile(mixed, 10) < np.percentile(two, 10) * 0.7
    assert np.percentile(mixed, 90) > np.percentile(one, 90) * 1.4
    assert count2 < count_mixed < count1  # divided by sqrt(1 * 2)
    np.testing.assert_array_equal(areas((1.0, 1.0))[0], one)  # an empty range is the number


def test_scale_one_draws_what_versions_without_a_scale_drew() -> None:
    """The demo's and the benchmarks' collections stay the same: the digest is of three samples drawn
    before ``scale`` existed (seed sequence 4, 64 px)."""
    digest = hashlib.sha256()
    for stream in np.random.SeedSequence(4).spawn(3):
        for array in make_instance_sample(np.random.default_rng(stream), size=64, scale=1.0):
            digest.update(array.tobytes())
    assert digest.hexdigest() == "236a6c1cf23f28707e72fbe8d1de76a062fd35b6fe8c8237a31481a3aec3ac86"


@pytest.mark.parametrize("scale", [1.5, (1.0, 1.5)])
def test_generate_instance_collection_passes_the_scale_on(tmp_path, scale) -> None:
    ids = generate_instance_collection(tmp_path / "big", n_images=2, size=64, seed=5, scale=scale)
    for image_id, stream in zip(ids, np.random.SeedSequence(5).spawn(2)):
        expected = make_instance_sample(np.random.default_rng(stream), size=64, scale=scale)[1]
        np.testing.assert_array_equal(read_mask(tmp_path / "big" / "masks" / f"{image_id}.png"), expected)


@pytest.mark.parametrize("kwargs", [{"size": 16}, {"n_images": 0}, {"n_images": 2.5}, {"scale": 0.1},
                                    {"scale": 9.0}, {"scale": (2.0, 1.0)}, {"scale": (0.1, 2.0)},
                                    {"scale": (1.0, 9.0)}, {"scale": "big"}, {"scale": (1.0, 1.5, 2.0)},
                                    {"scale": None}])
def test_generate_instance_collection_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        generate_instance_collection(tmp_path / "bad", **kwargs)
