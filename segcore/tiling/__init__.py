"""Tiled inference of images and volumes too large for one forward pass.

A large image is stored spatially chunked (see :mod:`segcore.collection.store`); each chunk is one work
unit and one chunk of every output array, so every output pixel is written by exactly one unit
(the chunk is the unit's *core*). Around its core a unit reads a *halo*; how it is used depends
on the model kind.

Semantic models (:func:`blend_block`): model tiles lie on one lattice for the whole image
(:func:`axis_starts`: step ``tile - overlap``, the last tile flush with the image edge). A unit
runs every lattice tile that touches its core and accumulates ``weight * logits`` over the core
only, with Gaussian weights (sigma = ``tile / 8``, as nnU-Net and MONAI) or linear ramps over the
overlap. A core pixel therefore gets the contributions of exactly the tiles that cover it in a
whole-image sliding window, whichever unit computes it: there are no seams between units, and
memory is bounded by the core and the tile batch, never by the image. The argmax of the blended
logits is the label.

The semantic part works in any number of spatial dimensions: :class:`WindowND` and the ``*_nd``
functions take per-axis shapes, tiles and overlaps (a volume ``(D, H, W)`` may have anisotropic
tiles such as ``(16, 128, 128)``). The 2-D functions (:class:`Window`, :func:`lattice`,
:func:`tiles_for`, :func:`blend_block`, ...) are the same computation on ``(H, W)``.

Instance models (:func:`keep_core_objects`, 2-D only): the detector runs on a core plus a halo of
``overlap`` pixels and keeps the objects whose box centre lies in its core. Cores partition
the image, so every object is kept by exactly one core, provided it lies whole inside that core's
window: an object no larger than the overlap always does. An object that touches the window
edge where that edge is not the image edge may have been cut: it is kept and *reported*
(``cut_risk``), never silently dropped. Kept objects carry global boxes and box-sized masks; the
pipeline pastes each output chunk from the objects of all units whose boxes reach into it
(:func:`paste_objects`, higher score wins where objects overlap), so objects that cross a seam
stay whole and ids are unique across the image.

Everything is imported from here; the code is in :mod:`segcore.tiling.windows` (windows, the
lattice), :mod:`segcore.tiling.blend` (weights, flips, blending) and :mod:`segcore.tiling.objects`
(instance objects).
"""

from segcore.tiling.blend import (BLENDS, MIN_WEIGHT, blend_block, blend_block_nd, flip_tta, tile_weights,
                                  tile_weights_nd)
from segcore.tiling.objects import BlockObjects, keep_core_objects, objects_on_seams, paste_objects
from segcore.tiling.windows import (Sizes, Window, WindowND, axis_starts, check_tiling, check_tiling_nd,
                                    chunk_windows, chunk_windows_nd, lattice, lattice_nd, per_axis, read_window,
                                    read_window_nd, tiles_for, tiles_for_nd)

__all__ = ["BLENDS", "MIN_WEIGHT", "BlockObjects", "Sizes", "Window", "WindowND", "axis_starts", "blend_block",
           "blend_block_nd", "check_tiling", "check_tiling_nd", "chunk_windows", "chunk_windows_nd", "flip_tta",
           "keep_core_objects", "lattice", "lattice_nd", "objects_on_seams", "paste_objects", "per_axis",
           "read_window", "read_window_nd", "tile_weights", "tile_weights_nd", "tiles_for", "tiles_for_nd"]
