"""The dataset fingerprint ingest records: dtype, channels, value range, negative values, mask labels."""

from __future__ import annotations

import numpy as np
import tifffile

from segcore.collection.fingerprint import fold, of_images, read_fingerprint
from segcore.config import IngestSpec
from tests.segcore.collection.serial import ingest_serially


def _write(folder, name, array) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / f"{name}.tif", array, photometric="minisblack")


def test_ingest_records_the_value_range_and_an_append_widens_it(tmp_path) -> None:
    _write(tmp_path / "land", "a", np.array([[-1000.0, 0.0], [40.0, 200.0]], dtype=np.float32))
    _write(tmp_path / "land", "b", np.array([[5.0, 6.0], [7.0, 1500.0]], dtype=np.float32))
    store = str(tmp_path / "s.zarr")
    ingest_serially(IngestSpec(images=str(tmp_path / "land"), store=store, incremental=True))
    fp = read_fingerprint(store)
    assert fp == {"dtype": "float32", "dtypes": ["float32"], "channels": 1, "min": -1000.0, "max": 1500.0,
                  "negative": True, "images": 2, "mask_maxima": {}}
    _write(tmp_path / "land", "c", np.array([[-2000.0, 0.0], [0.0, 0.0]], dtype=np.float32))
    ingest_serially(IngestSpec(images=str(tmp_path / "land"), store=store, incremental=True))
    assert read_fingerprint(store)["min"] == -2000.0 and read_fingerprint(store)["images"] == 3


def test_fingerprint_of_arrays_in_memory() -> None:
    images = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    images[1, 0, 0, 2] = 255
    assert of_images(images) == {"dtype": "uint8", "dtypes": ["uint8"], "channels": 3, "min": 0.0, "max": 255.0,
                                 "negative": False, "images": 2}
    assert fold([]) is None and fold([{"status": "error"}], {"min": 1.0}) == {"min": 1.0}


def test_ingest_counts_labelled_images_by_their_largest_mask_label(tmp_path) -> None:
    for name, top in (("a", 0), ("b", 2), ("c", 2), ("d", 1)):
        _write(tmp_path / "images", name, np.full((4, 4), 7, dtype=np.uint8))
        mask = np.zeros((4, 4), dtype=np.uint8)
        mask[1, 1] = top
        _write(tmp_path / "masks", name, mask)
    _write(tmp_path / "images", "e", np.zeros((4, 4), dtype=np.uint8))  # no mask: not counted
    store = str(tmp_path / "s.zarr")
    spec = IngestSpec(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"), store=store, incremental=True)
    ingest_serially(spec)
    assert read_fingerprint(store)["mask_maxima"] == {"0": 1, "1": 1, "2": 2}
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0] = 11
    _write(tmp_path / "images", "f", np.ones((4, 4), dtype=np.uint8))
    _write(tmp_path / "masks", "f", mask)
    ingest_serially(spec)  # an incremental ingest adds its images' labels to the counts
    assert read_fingerprint(store)["mask_maxima"] == {"0": 1, "1": 1, "2": 2, "11": 1}


def test_instance_masks_are_not_counted_and_old_fingerprints_stay_unknown(tmp_path) -> None:
    _write(tmp_path / "images", "a", np.full((4, 4), 7, dtype=np.uint8))
    _write(tmp_path / "masks", "a", np.arange(16, dtype=np.uint16).reshape(4, 4))
    store = str(tmp_path / "s.zarr")
    ingest_serially(IngestSpec(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"), store=store,
                               mask_kind="instance"))
    assert read_fingerprint(store)["mask_maxima"] == {}
    row = {"status": "ok", "dtype": "uint8", "channels": 1, "value_min": 0.0, "value_max": 1.0, "mask_status": "ok",
           "mask_max": 3}
    old = {"dtype": "uint8", "dtypes": ["uint8"], "channels": 1, "min": 0.0, "max": 9.0, "negative": False, "images": 5}
    assert "mask_maxima" not in fold([row], old)  # the five earlier images' labels were never counted
    assert fold([row], {**old, "mask_maxima": {"3": 2, "10": 1}})["mask_maxima"] == {"3": 3, "10": 1}
    assert fold([dict(row, mask_status="error")])["mask_maxima"] == {}


def test_a_volume_counts_each_slice_by_its_largest_label(tmp_path) -> None:
    _write(tmp_path / "images", "vol", np.full((3, 8, 8), 9, dtype=np.uint8))  # a z-stack: one volume
    mask = np.zeros((3, 8, 8), dtype=np.uint8)
    mask[1, 2, 2], mask[2, 3, 3] = 1, 2
    _write(tmp_path / "masks", "vol", mask)
    store = str(tmp_path / "s.zarr")
    ingest_serially(IngestSpec(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"), store=store))
    assert read_fingerprint(store)["mask_maxima"] == {"0": 1, "1": 1, "2": 1}
