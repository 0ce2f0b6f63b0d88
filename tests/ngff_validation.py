"""OME-NGFF 0.5 checks shared by the tests: validation with ome-zarr-models (a validator that
implements the specification) and a headless read-back with ome-zarr-py's reader (no viewer)."""

from __future__ import annotations

import numpy as np
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.v05.image_label import ImageLabel
from ome_zarr_models.v05.labels import Labels


def validate_labels_group(location: str) -> dict[str, ImageLabel]:
    """Validate the labels group at ``location`` and every label image in it (multiscales, axes,
    transformations, arrays' dimension names and integer dtypes, image-label); returns the label
    images by name. Raises (pydantic's ValidationError, ValueError, RuntimeError) on any violation."""
    group = zarr.open_group(location, mode="r")
    labels = Labels.from_zarr(group)
    assert labels.label_paths == sorted(group.group_keys()), "every label image is listed"
    return {name: ImageLabel.from_zarr(group[name]) for name in labels.label_paths}


def read_levels(location: str) -> tuple[list[np.ndarray], dict]:
    """The resolution levels of the label image at ``location`` as ome-zarr-py's reader returns them
    (full resolution first), and the metadata it parsed (axes, coordinateTransformations, colours)."""
    zarr_location = parse_url(location)
    assert zarr_location is not None, f"ome-zarr finds no Zarr group at {location}"
    node = next(iter(Reader(zarr_location)()))
    return [np.asarray(level) for level in node.data], node.metadata
