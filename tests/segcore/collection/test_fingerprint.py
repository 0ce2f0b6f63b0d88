"""The dataset fingerprint ingest records: dtype, channels, value range, negative values."""

from __future__ import annotations

import numpy as np
import tifffile

from segcore.collection.fingerprint import fold, of_images, read_fingerprint
from segcore.config import IngestSpec
from tests.segcore.collection.serial import ingest_serially


def _write(folder, name, array) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / f"{name}.tif", array)


def test_ingest_records_the_value_range_and_an_append_widens_it(tmp_path) -> None:
    _write(tmp_path / "land", "a", np.array([[-1000.0, 0.0], [40.0, 200.0]], dtype=np.float32))
    _write(tmp_path / "land", "b", np.array([[5.0, 6.0], [7.0, 1500.0]], dtype=np.float32))
    store = str(tmp_path / "s.zarr")
    ingest_serially(IngestSpec(images=str(tmp_path / "land"), store=store, incremental=True))
    fp = read_fingerprint(store)
    assert fp == {"dtype": "float32", "dtypes": ["float32"], "channels": 1, "min": -1000.0, "max": 1500.0,
                  "negative": True, "images": 2}
    _write(tmp_path / "land", "c", np.array([[-2000.0, 0.0], [0.0, 0.0]], dtype=np.float32))
    ingest_serially(IngestSpec(images=str(tmp_path / "land"), store=store, incremental=True))
    assert read_fingerprint(store)["min"] == -2000.0 and read_fingerprint(store)["images"] == 3


def test_fingerprint_of_arrays_in_memory() -> None:
    images = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    images[1, 0, 0, 2] = 255
    assert of_images(images) == {"dtype": "uint8", "dtypes": ["uint8"], "channels": 3, "min": 0.0, "max": 255.0,
                                 "negative": False, "images": 2}
    assert fold([]) is None and fold([{"status": "error"}], {"min": 1.0}) == {"min": 1.0}
