"""Zarr arrays and OME-Zarr images as collection sources, read in place (slab by slab, no copy first).

A source is a directory named ``*.zarr`` holding either

- an **OME-Zarr image** (NGFF 0.4 ``multiscales`` in the group attributes, or 0.5 under ``ome``):
  its full-resolution level (the first dataset) is read, its axes and physical scale come from the
  metadata (``t`` of length 1 dropped, ``c`` up to 4 channels, ``z``, ``y``, ``x``), or
- a plain **Zarr array** (v2 or v3): axes from its ``dimension_names`` when it has them, else by
  rank: ``(y, x)``, ``(z, y, x)``, ``(z, y, x, c)`` with ``c <= 4`` last, or ``(c, z, y, x)``.

Either way the source is a volume of :class:`~segcore.collection.volumes.VolumeInfo` (a 2-D array
is a volume of one slice), read ``[z0, z1)`` slices at a time as ``(k, H, W, C)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from segcore.errors import ImageReadError

log = logging.getLogger(__name__)

_MAX_CHANNELS = 4
_KNOWN_AXES = frozenset("tczyx")


def is_zarr_source(path: str | Path) -> bool:
    """Whether ``path`` is a directory named ``*.zarr`` that holds Zarr metadata."""
    p = Path(path)
    return (p.suffix.lower() == ".zarr" and p.is_dir()
            and any((p / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup")))


def _open(p: Path) -> tuple[Any, list[str], tuple[float, ...], str]:
    """``(array, axis names, scale per axis, unit)`` of the full-resolution array of a source."""
    try:
        node = zarr.open(str(p), mode="r")
    except (zarr.errors.BaseZarrError, ValueError, OSError, KeyError) as exc:
        raise ImageReadError(f"cannot open {p} as Zarr: {exc}") from exc
    if isinstance(node, zarr.Array):
        names = list(getattr(node.metadata, "dimension_names", None) or [])
        if names and all(isinstance(n, str) and n.lower() in _KNOWN_AXES for n in names):
            return node, [n.lower() for n in names], (1.0,) * node.ndim, ""
        return node, _axes_by_rank(node.shape, p), (1.0,) * node.ndim, ""
    attrs = dict(node.attrs)
    multiscales = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    if not multiscales:
        raise ImageReadError(f"cannot read {p}: a Zarr group without OME-Zarr 'multiscales' metadata; point at an "
                             "array, or at an OME-Zarr image")
    ms = multiscales[0]
    try:
        dataset = ms["datasets"][0]
        array = node[dataset["path"]]
        axes = [a["name"].lower() if isinstance(a, dict) else str(a).lower() for a in ms.get("axes", [])]
        units = {a.get("unit") for a in ms.get("axes", []) if isinstance(a, dict) and a.get("type") == "space"}
    except (KeyError, IndexError, TypeError) as exc:
        raise ImageReadError(f"cannot read {p}: malformed OME-Zarr multiscales metadata ({exc!r})") from exc
    if not axes:
        axes = _axes_by_rank(array.shape, p)
    scale = np.ones(array.ndim)
    for transforms in (dataset.get("coordinateTransformations", []), ms.get("coordinateTransformations", [])):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale", [])) == array.ndim:
                scale = scale * np.asarray(t["scale"], dtype=np.float64)
    unit = units.pop() if len(units) == 1 and None not in units else ""
    return array, axes, tuple(float(s) for s in scale), unit or ""


def _axes_by_rank(shape: tuple[int, ...], p: Path) -> list[str]:
    if len(shape) == 2:
        return ["y", "x"]
    if len(shape) == 3:
        return ["z", "y", "x"]
    if len(shape) == 4 and shape[-1] <= _MAX_CHANNELS:
        return ["z", "y", "x", "c"]
    if len(shape) == 4 and shape[0] <= _MAX_CHANNELS:
        return ["c", "z", "y", "x"]
    raise ImageReadError(f"cannot read {p}: a Zarr array of shape {shape} without dimension names; give it "
                         "dimension names (z, y, x, c) or write it as (z, y, x)")


def _layout(array: Any, axes: list[str], p: Path) -> dict[str, int]:
    """Axis name -> size, after checking the axes make a volume."""
    if len(axes) != array.ndim or len(set(axes)) != len(axes) or not set(axes) <= _KNOWN_AXES:
        raise ImageReadError(f"cannot read {p}: axes {axes} do not fit an array of shape {array.shape}")
    sizes = dict(zip(axes, array.shape))
    if "y" not in sizes or "x" not in sizes:
        raise ImageReadError(f"cannot read {p}: axes {axes} have no y and x")
    if sizes.get("t", 1) != 1:
        raise ImageReadError(f"cannot read {p}: {sizes['t']} time points; split the time series into one image per "
                             "time point")
    if sizes.get("c", 1) > _MAX_CHANNELS:
        raise ImageReadError(f"cannot read {p}: {sizes['c']} channels; at most {_MAX_CHANNELS}")
    return sizes


def probe_zarr(path: str | Path) -> dict[str, Any]:
    """The fields of a :class:`~segcore.collection.volumes.VolumeInfo` for a Zarr source (metadata only)."""
    p = Path(path)
    array, axes, scale, unit = _open(p)
    sizes = _layout(array, axes, p)
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "uifb":
        raise ImageReadError(f"cannot read {p}: unsupported sample type {dtype}; save it as integer or float")
    spacing = {a: s for a, s in zip(axes, scale)}
    return {"depth": sizes.get("z", 1), "height": sizes["y"], "width": sizes["x"], "channels": sizes.get("c", 1),
            "dtype": "uint8" if dtype.kind == "b" else dtype.newbyteorder("=").name,
            "spacing": (spacing.get("z", 1.0), spacing["y"], spacing["x"]), "unit": unit, "format": "zarr"}


def read_zarr_slab(path: str | Path, z0: int, z1: int) -> np.ndarray:
    """Slices ``[z0, z1)`` of a Zarr source as a ``(z1 - z0, H, W, C)`` array (only their chunks are read)."""
    p = Path(path)
    array, axes, _, _ = _open(p)
    sizes = _layout(array, axes, p)
    depth = sizes.get("z", 1)
    if not 0 <= z0 < z1 <= depth:
        raise ImageReadError(f"cannot read slices [{z0}, {z1}) of {p}: it has {depth} slices")
    index = tuple(slice(z0, z1) if a == "z" else slice(None) for a in axes)
    try:
        data = np.asarray(array[index])
    except (zarr.errors.BaseZarrError, ValueError, OSError, KeyError) as exc:
        raise ImageReadError(f"cannot decode slices [{z0}, {z1}) of {p}: {exc}") from exc
    present = list(axes)
    for axis in ("z", "c"):  # missing axes become length 1
        if axis not in present:
            data = data[..., np.newaxis]
            present.append(axis)
    order = [present.index(a) for a in ("z", "y", "x", "c")] + ([present.index("t")] if "t" in present else [])
    data = np.transpose(data, order)
    data = data.reshape(z1 - z0, sizes["y"], sizes["x"], sizes.get("c", 1))
    return np.ascontiguousarray(data, dtype=np.uint8 if data.dtype.kind == "b" else data.dtype.newbyteorder("="))


__all__ = ["is_zarr_source", "probe_zarr", "read_zarr_slab"]
