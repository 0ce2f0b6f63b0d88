"""OME-Zarr (OME-NGFF 0.5) label images, so NGFF viewers open the run's masks.

A run's ``masks.zarr`` (and ``instances.zarr``) is an NGFF *labels* group: its attributes list
its label images (``{"ome": {"version": "0.5", "labels": ["g000", ...]}}``), one per store
group of same-size images. Each label image ``masks.zarr/<group>`` is a group holding one array
per resolution level:

- ``0``: the full-resolution labels (``(N, H, W)`` for a group of N 2-D images, ``(D, H, W)``
  for a volume), the array segflow writes and reads;
- ``1``, ``2``, ...: the same labels downsampled by 2 in the spatial axes by the most frequent
  label (:mod:`segcore.pyramid`), written once the full-resolution level is complete.

Its ``"ome"`` attributes hold:

- ``multiscales``: one entry named after the group, ``axes`` from the arrays' dimension names
  (``z``, ``y``, ``x``: type ``space``, with a ``unit`` when the voxel size is known; ``image``:
  custom type ``index``, the position of an image in its group, never downsampled), one dataset
  per level with a ``scale`` transformation: the voxel size at level 0 (1 per axis for images of
  unknown pixel size) times the level's downsampling factor per axis. ``type`` names the
  downsampling (``mode``);
- ``image-label``: ``colors`` (class 0 transparent, one fixed colour per other class; instance
  ids get only the transparent background, viewers colour the rest), ``properties`` (class names)
  and, when the store is reachable by a relative path, ``source.image`` pointing at the store's
  array of the same images (``(N, H, W, C)``; the store itself carries no NGFF metadata).

NGFF nests label images in a ``labels`` group inside the image they annotate; segflow's images
live in the collection store, which a run never writes, so ``masks.zarr`` is a standalone labels
group. segflow's own ``attrs["segflow"]`` of ``masks.zarr`` is left as it is.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import zarr

from segcore.colours import class_colour
from segcore.errors import ConfigError

NGFF_VERSION = "0.5"

#: Path of the full-resolution level inside a label image group.
LEVEL0 = "0"

#: Dimension names of a run's mask arrays (a group of 2-D images).
IMAGE_AXES = ("image", "y", "x")

#: NGFF axis type of each dimension name segflow writes.
AXIS_TYPES = {"image": "index", "z": "space", "y": "space", "x": "space"}

#: Spatial units accepted for a voxel size (NGFF takes UDUNITS-2 names); short forms map to them.
SPACE_UNITS = {"nanometer": "nanometer", "micrometer": "micrometer", "millimeter": "millimeter",
               "nm": "nanometer", "um": "micrometer", "µm": "micrometer", "mm": "millimeter"}


def spatial_axes(dimension_names: Sequence[str]) -> tuple[int, ...]:
    """Positions of the spatial axes (``z``, ``y``, ``x``) among ``dimension_names``."""
    unknown = [n for n in dimension_names if n not in AXIS_TYPES]
    if unknown:
        raise ConfigError(f"label arrays take the dimensions {sorted(AXIS_TYPES)}, not {unknown}")
    found = tuple(i for i, n in enumerate(dimension_names) if AXIS_TYPES[n] == "space")
    if len(found) not in (2, 3) or found != tuple(range(len(dimension_names) - len(found), len(dimension_names))):
        raise ConfigError(f"label arrays need 2 or 3 spatial axes last (y, x or z, y, x), not {tuple(dimension_names)}")
    return found


def label_axes(dimension_names: Sequence[str], *, unit: str | None = None) -> list[dict[str, str]]:
    """NGFF ``axes`` of arrays with ``dimension_names``; spatial axes carry ``unit`` when given."""
    spatial_axes(dimension_names)
    axes = []
    for name in dimension_names:
        axis = {"name": name, "type": AXIS_TYPES[name]}
        if unit is not None and axis["type"] == "space":
            axis["unit"] = unit
        axes.append(axis)
    return axes


def level0_scale(dimension_names: Sequence[str], spacing: Sequence[float] | None, unit: str | None
                 ) -> tuple[list[float], str | None]:
    """``(scale of level 0 per axis, NGFF unit)``: ``spacing`` (one voxel size per spatial axis, in
    ``unit``) on the spatial axes, 1 elsewhere; no spacing means 1 per axis and no unit."""
    space = spatial_axes(dimension_names)
    scale = [1.0] * len(dimension_names)
    if spacing is None:
        if unit is not None:
            raise ConfigError(f"a unit ({unit!r}) needs a spacing: pass the voxel size per spatial axis too")
        return scale, None
    if unit not in SPACE_UNITS:
        raise ConfigError(f"the unit of a spacing must be one of {sorted(SPACE_UNITS)}, not {unit!r}")
    if len(spacing) != len(space) or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ConfigError(f"spacing needs one positive voxel size per spatial axis "
                          f"({[dimension_names[i] for i in space]}), not {list(spacing)}")
    for i, s in zip(space, spacing):
        scale[i] = float(s)
    return scale, SPACE_UNITS[unit]


def multiscale(name: str, axes: Sequence[dict[str, str]], base_scale: Sequence[float],
               factors: Sequence[Sequence[int]]) -> dict[str, Any]:
    """One ``multiscales`` entry: level ``k`` at path ``str(k)`` with scale ``base_scale * factors[k]``
    (``factors[0]`` is all ones: the full resolution)."""
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [float(s * f) for s, f in zip(base_scale, fk)]}]}
        for k, fk in enumerate(factors)]
    entry: dict[str, Any] = {"name": name, "axes": [dict(a) for a in axes], "datasets": datasets}
    if len(factors) > 1:
        entry["type"] = "mode"
        entry["metadata"] = {"method": "segcore.pyramid.downsample_mode",
                             "description": "most frequent label of each 2x2 (2x2x2) block, ties to the smallest"}
    return entry


def class_colors(num_classes: int) -> list[dict[str, Any]]:
    """``image-label.colors`` for class ids ``0..num_classes-1``: 0 transparent, the others opaque
    :func:`segcore.colours.class_colour` (the colours of the run's figures)."""
    colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    colors += [{"label-value": k, "rgba": [*class_colour(k), 255]} for k in range(1, num_classes)]
    return colors


def label_image_attrs(name: str, *, class_names: Sequence[str] | None, source: str | None = None,
                      dimension_names: Sequence[str] = IMAGE_AXES, spacing: Sequence[float] | None = None,
                      unit: str | None = None) -> dict[str, Any]:
    """The ``"ome"`` attribute of label image ``name`` with its full-resolution level only.

    ``class_names`` gives class colours and properties (class labels); ``None`` means instance
    ids (only the background colour). ``source`` is the relative path to the image, if any.
    ``spacing`` is the voxel size per spatial axis (``(y, x)`` or ``(z, y, x)``) in ``unit``
    (``"micrometer"``, ``"millimeter"``, ...); ``None``: pixels of unknown size (scale 1, no unit).
    """
    scale, ngff_unit = level0_scale(dimension_names, spacing, unit)
    entry = multiscale(name, label_axes(dimension_names, unit=ngff_unit), scale, [[1] * len(dimension_names)])
    if class_names is None:
        label: dict[str, Any] = {"colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}]}
    else:
        label = {"colors": class_colors(len(class_names)),
                 "properties": [{"label-value": k, "class": c} for k, c in enumerate(class_names)]}
    if source is not None:
        label["source"] = {"image": source}
    return {"version": NGFF_VERSION, "multiscales": [entry], "image-label": label}


def labels_group_attrs(names: Sequence[str]) -> dict[str, Any]:
    """The ``"ome"`` attribute of a labels group holding the label images ``names``."""
    return {"version": NGFF_VERSION, "labels": sorted(names)}


def create_label_image(parent: zarr.Group, name: str, *, shape: Sequence[int], chunks: Sequence[int], dtype: str,
                       class_names: Sequence[str] | None, dimension_names: Sequence[str] = IMAGE_AXES,
                       spacing: Sequence[float] | None = None, unit: str | None = None,
                       source: str | None = None) -> zarr.Array:
    """Create label image ``parent/name`` with an empty (0-filled) full-resolution array of ``shape``,
    ``chunks`` and integer ``dtype`` at ``name/0``; returns that array. Keywords as in
    :func:`label_image_attrs`; further levels come from :func:`segcore.pyramid.write_label_pyramid`."""
    attrs = label_image_attrs(name, class_names=class_names, source=source, dimension_names=dimension_names,
                              spacing=spacing, unit=unit)
    image = parent.create_group(name, attributes={"ome": attrs}, overwrite=True)
    return image.create_array(LEVEL0, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0,
                              dimension_names=tuple(dimension_names))
