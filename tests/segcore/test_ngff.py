"""OME-NGFF 0.5 label images: the attribute builder, a 3-D label volume with its pyramid validated
against the specification (ome-zarr-models) and read back headless with ome-zarr-py's reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from segcore.errors import ConfigError
from segcore.ngff import create_label_image, label_image_attrs, labels_group_attrs
from segcore.pyramid import downsample_mode, write_label_pyramid
from tests.ngff_validation import read_levels, validate_labels_group


def test_images_of_unknown_pixel_size_have_scale_1_and_no_unit() -> None:
    ome = label_image_attrs("g000", class_names=["bg", "cell"])
    assert ome["version"] == "0.5" and "version" not in ome["multiscales"][0]
    (entry,) = ome["multiscales"]
    assert entry["name"] == "g000"
    assert entry["axes"] == [{"name": "image", "type": "index"}, {"name": "y", "type": "space"},
                             {"name": "x", "type": "space"}]
    assert entry["datasets"] == [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                                               "scale": [1.0, 1.0, 1.0]}]}]
    assert ome["image-label"]["properties"] == [{"label-value": 0, "class": "bg"}, {"label-value": 1, "class": "cell"}]


def test_a_volume_carries_its_voxel_size_and_unit() -> None:
    ome = label_image_attrs("ct", class_names=None, dimension_names=("z", "y", "x"), spacing=(2.5, 0.7, 0.7),
                            unit="mm")
    (entry,) = ome["multiscales"]
    assert entry["axes"] == [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"]
    assert entry["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [2.5, 0.7, 0.7]}]
    assert ome["image-label"] == {"colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}]}


@pytest.mark.parametrize("kwargs, message", [
    ({"unit": "micrometer"}, "needs a spacing"),
    ({"spacing": (1.0, 1.0, 1.0), "unit": "inch"}, "unit of a spacing"),
    ({"spacing": (1.0, 1.0), "unit": "micrometer"}, "one positive voxel size per spatial axis"),
    ({"spacing": (1.0, 0.0, 1.0), "unit": "micrometer"}, "one positive voxel size"),
    ({"dimension_names": ("c", "y", "x")}, "take the dimensions"),
    ({"dimension_names": ("y", "image", "x")}, "spatial axes last"),
])
def test_bad_spacing_units_and_axes_are_refused(kwargs: dict, message: str) -> None:
    kwargs = {"dimension_names": ("z", "y", "x"), **kwargs}
    with pytest.raises(ConfigError, match=message):
        label_image_attrs("v", class_names=None, **kwargs)


def _volume(shape: tuple[int, int, int]) -> np.ndarray:
    """(D, H, W) uint16 labels: three overlapping boxes (1, 2, 3) on background, and sparse noise."""
    rng = np.random.default_rng(7)
    d, h, w = shape
    labels = np.zeros(shape, np.uint16)
    labels[2:d - 3, 10:h // 2, 20:w - 30] = 1
    labels[d // 3:, h // 3:h - 5, 5:w // 2] = 2
    labels[1:4, 100:140, 7:200] = 3
    noise = rng.random(shape) < 0.05
    labels[noise] = rng.integers(0, 4, int(noise.sum()))
    return labels


def _write_volume(root: zarr.Group, labels: np.ndarray) -> zarr.Group:
    level0 = create_label_image(root, "organs", shape=labels.shape, chunks=(8, 64, 64), dtype="uint16",
                                class_names=["background", "liver", "kidney", "spleen"],
                                dimension_names=("z", "y", "x"), spacing=(2.5, 0.8, 0.8), unit="millimeter")
    for z in range(0, labels.shape[0], 8):  # written slab by slab, as a volume segmentation would
        level0[z:z + 8] = labels[z:z + 8]
    root.attrs["ome"] = labels_group_attrs(["organs"])
    return root["organs"]


def test_a_label_volume_with_its_pyramid_is_valid_ngff_and_reads_back_headless(tmp_path: Path) -> None:
    location = str(tmp_path / "labels.zarr")
    labels = _volume((21, 300, 259))  # odd sizes: partial blocks at the far edges
    image = _write_volume(zarr.open_group(location, mode="w"), labels)
    assert write_label_pyramid(image, max_side=64) == 4

    # the specification's rules, by a validator that implements them
    (model,) = validate_labels_group(location).values()
    (entry,) = model.attributes.ome.multiscales
    assert [d.path for d in entry.datasets] == ["0", "1", "2", "3"]
    assert [list(d.coordinateTransformations[0].scale) for d in entry.datasets] == [
        [2.5, 0.8, 0.8], [5.0, 1.6, 1.6], [10.0, 3.2, 3.2], [20.0, 6.4, 6.4]]
    assert [a.unit for a in entry.axes] == ["millimeter"] * 3 and entry.type == "mode"

    # each level is the mode of the one above, computed here on the whole volume at once
    expected = [labels]
    for _ in range(3):
        expected.append(downsample_mode(expected[-1], (2, 2, 2)))
    assert [e.shape for e in expected] == [(21, 300, 259), (11, 150, 130), (6, 75, 65), (3, 38, 33)]
    for k, want in enumerate(expected):
        np.testing.assert_array_equal(image[str(k)][:], want)
    assert image["1"].chunks == (8, 64, 64) and image["3"].chunks == (3, 38, 33)

    # headless read-back with ome-zarr-py's reader
    levels, meta = read_levels(str(tmp_path / "labels.zarr" / "organs"))
    assert [lv.shape for lv in levels] == [e.shape for e in expected]
    np.testing.assert_array_equal(levels[0], labels)
    np.testing.assert_array_equal(levels[3], expected[3])
    assert [a["name"] for a in meta["axes"]] == ["z", "y", "x"]
    assert meta["coordinateTransformations"][1] == [{"type": "scale", "scale": [5.0, 1.6, 1.6]}]
    assert meta["color"][0] == [0, 0, 0, 0] and len(meta["color"]) == 4
    assert meta["properties"][2] == {"class": "kidney"}


def test_a_written_pyramid_is_kept_until_level_0_changes(tmp_path: Path) -> None:
    image = _write_volume(zarr.open_group(str(tmp_path / "l.zarr"), mode="w"), _volume((8, 160, 140)))
    assert write_label_pyramid(image, max_side=64) == 3
    before = image["2"][:]
    image["0"][:] = 3
    assert write_label_pyramid(image, max_side=64) == 3
    np.testing.assert_array_equal(image["2"][:], before)  # kept: the levels are listed, nothing is rewritten
    assert not (before == 3).all()
    assert write_label_pyramid(image, max_side=64, overwrite=True) == 3
    assert (image["2"][:] == 3).all()


def _violation(location: str) -> str | None:
    """What the validator says is wrong with the labels group at ``location`` (its messages, outer to
    inner), or None when it is valid."""
    try:
        validate_labels_group(location)
    except Exception as exc:  # the validator wraps pydantic's and its own errors
        messages, cause = [], exc
        while cause is not None:
            messages.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        return " | ".join(messages)
    return None


def test_the_validator_rejects_what_the_specification_forbids(tmp_path: Path) -> None:
    location = str(tmp_path / "labels.zarr")
    image = _write_volume(zarr.open_group(location, mode="w"), _volume((8, 40, 40)))
    assert _violation(location) is None
    ome = dict(image.attrs["ome"])
    entry = ome["multiscales"][0]
    renamed = [*entry["axes"][:2], {"name": "col", "type": "space"}]  # the array's dimensions are z, y, x
    image.attrs["ome"] = {**ome, "multiscales": [{**entry, "axes": renamed}]}
    assert "does not match the dimension names" in _violation(location)
    image.attrs["ome"] = {**ome, "multiscales": [{**entry, "datasets": [*entry["datasets"], {
        "path": "1", "coordinateTransformations": [{"type": "scale", "scale": [5.0, 1.6, 1.6]}]}]}]}
    assert "Expected to find an array at 1" in _violation(location)  # a level listed before it is written
    image.attrs["ome"] = {**ome, "multiscales": [{**entry, "datasets": [*entry["datasets"], {
        "path": "1", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0, 2.0]}]}]}]}
    assert "lower resolution" in _violation(location)  # levels go from the finest to the coarsest
    image.attrs["ome"] = {**ome, "version": "0.4"}
    assert "0.5" in _violation(location)
