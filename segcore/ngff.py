"""OME-Zarr (OME-NGFF 0.5) label metadata for the run's mask arrays, so NGFF viewers open them.

A run's ``masks.zarr`` (and ``instances.zarr``) group holds one ``(N, H, W)`` label array per
store group of same-size images. The group is described as an NGFF *label image* (attributes
under the ``"ome"`` key):

- ``multiscales``: one entry per array, named after the group, with a single resolution level
  (``datasets[0].path`` is the array) and a ``scale`` of 1 on every axis (pixels; the store
  records no physical pixel size). Axes: ``image`` (custom type ``index``: position of the image
  in its group), then ``y`` and ``x`` (type ``space``), matching the arrays' ``dimension_names``.
  Readers open the first entry unless asked for another by name.
- ``image-label``: ``colors`` (class 0 transparent, one fixed colour per other class; instance
  ids get only the transparent background, viewers colour the rest), ``properties`` (class names)
  and, when the store is reachable by a relative path, ``source.image`` pointing at the store's
  ``images`` group, whose arrays have the same names and image order (``(N, H, W, C)``; that
  group itself carries no NGFF metadata).

NGFF nests label images in a ``labels`` group inside the image they annotate; segflow's images
live in the collection store, which a run never writes, so ``masks.zarr`` is a standalone label
image and no ``labels`` listing is written. segflow's own ``attrs["segflow"]`` is left as it is.
"""

from __future__ import annotations

from typing import Any, Sequence

from segcore.colours import class_colour

NGFF_VERSION = "0.5"

#: Axes of every mask array, in array order (``dimension_names`` of the arrays).
AXES: tuple[dict[str, str], ...] = (
    {"name": "image", "type": "index"},
    {"name": "y", "type": "space"},
    {"name": "x", "type": "space"},
)


def class_colors(num_classes: int) -> list[dict[str, Any]]:
    """``image-label.colors`` for class ids ``0..num_classes-1``: 0 transparent, the others opaque
    :func:`segcore.colours.class_colour` (the colours of the run's figures)."""
    colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    colors += [{"label-value": k, "rgba": [*class_colour(k), 255]} for k in range(1, num_classes)]
    return colors


def label_image_attrs(arrays: Sequence[str], *, class_names: Sequence[str] | None, source: str | None = None
                      ) -> dict[str, Any]:
    """The ``"ome"`` attribute of a group holding the ``(N, H, W)`` label arrays ``arrays``.

    ``class_names`` gives class colours and properties (class labels); ``None`` means instance
    ids (only the background colour). ``source`` is the relative path to the image group, if any.
    """
    multiscales = [
        {"name": name, "axes": [dict(a) for a in AXES],
         "datasets": [{"path": name, "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}
        for name in sorted(arrays)
    ]
    if class_names is None:
        label: dict[str, Any] = {"colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}]}
    else:
        label = {"colors": class_colors(len(class_names)),
                 "properties": [{"label-value": k, "class": name} for k, name in enumerate(class_names)]}
    if source is not None:
        label["source"] = {"image": source}
    return {"version": NGFF_VERSION, "multiscales": multiscales, "image-label": label}
