"""Work units for inference: one unit is one chunk of one store group.

A unit carries only names and index ranges (never arrays), so it can be shipped to any worker.
In a tiled group (large images, see :mod:`segcore.tiling`) a unit is one spatial chunk of one
image: its ``window`` is the unit's core. :func:`check_alignment` proves, before fan-out, that
every unit covers exactly one chunk of the output arrays and that the units cover every pixel, so
no two workers ever write the same chunk.

A run records its plan once (:class:`RunPlan`, ``RUN_DIR/plan.json``, written by
:func:`segcore.run.rundir.prepare_run`): its units, the parts of its tiled images and its tiling.
Flows, the reader, incremental runs and the lake read that record; nothing plans again or
parses unit names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from segcore.collection.store import StoreInfo
from segcore.errors import ConfigError, PlanError
from segcore.models.checkpoint import ModelMeta
from segcore.run.context import Tiling
from segcore.tiling import BLENDS, Window, chunk_windows

#: Default model tile of semantic models.
DEFAULT_TILE = 512
#: Default tile side of a volumetric model along each axis (3-D tiles; see segcore.run.volume_model).
DEFAULT_VOLUME_TILE = 64
#: Instance models: default detector core side and halo.
DEFAULT_INSTANCE_TILE = 256
DEFAULT_INSTANCE_OVERLAP = 64


@dataclass(frozen=True)
class WorkUnit:
    """Images ``[start, stop)`` of store group ``group``; with a ``window``, that block of one image."""

    unit_id: int
    group: str
    start: int
    stop: int
    window: Window | None = None

    @property
    def name(self) -> str:
        return f"unit-{self.unit_id:05d}"

    @property
    def label(self) -> str:
        """Human-readable name for logs and task-run names."""
        if self.window is not None:
            w = self.window
            return f"{self.name} [{self.group} image {self.start} y {w.y0}-{w.y1 - 1} x {w.x0}-{w.x1 - 1}]"
        return f"{self.name} [{self.group} images {self.start}-{self.stop - 1}]"

    @property
    def n_images(self) -> int:
        return self.stop - self.start


def plan_units(store: StoreInfo, *, tiled: bool = True) -> list[WorkUnit]:
    """One unit per chunk of every group, numbered in group order.

    A tiled group gives one unit per spatial chunk of each image (row by row); ``tiled=False``
    treats its images whole instead (one unit per image; the output arrays must then be chunked
    by whole images too).
    """
    units: list[WorkUnit] = []
    for g in store.groups:
        for c in range(g.n_chunks):
            start, stop = g.chunk_range(c)
            if g.tile and tiled:
                for w in chunk_windows(g.height, g.width, g.tile):
                    units.append(WorkUnit(unit_id=len(units), group=g.name, start=start, stop=stop, window=w))
            else:
                units.append(WorkUnit(unit_id=len(units), group=g.name, start=start, stop=stop))
    return units


def check_alignment(units: Sequence[WorkUnit], *, chunks: Mapping[str, Sequence[int]],
                    counts: Mapping[str, Sequence[int]]) -> None:
    """Refuse a plan whose units are not exactly the output arrays' chunks.

    Args:
        units: the plan.
        chunks: group name -> ``(images, height, width)`` of one chunk of the output array.
        counts: group name -> ``(images, height, width)`` of the output array.

    Raises:
        PlanError: a unit straddles chunks, overlaps another, or some images or pixels have no unit.
    """
    covered: dict[str, list[tuple[int, int]]] = {}
    blocks: dict[tuple[str, int], set[Window]] = {}
    for u in units:
        if u.group not in chunks:
            raise PlanError(f"{u.label}: the output has no array for group {u.group!r}")
        if u.group not in counts:
            raise PlanError(f"{u.label}: no image count for group {u.group!r}")
        (k, ch, cw), (n, height, width) = chunks[u.group], counts[u.group]
        if u.window is not None:
            w = u.window
            if (k != 1 or u.stop != u.start + 1 or u.stop > n or w.y0 % ch or w.x0 % cw
                    or w.y1 != min(w.y0 + ch, height) or w.x1 != min(w.x0 + cw, width)):
                raise PlanError(f"{u.label} is not aligned to output chunks of {ch} x {cw} pixels; two workers "
                                "could write the same chunk. Re-create the run directory for this store.")
            seen = blocks.setdefault((u.group, u.start), set())
            if w in seen:
                raise PlanError(f"{u.label}: two units write the same block")
            seen.add(w)
            if len(seen) == 1:
                covered.setdefault(u.group, []).append((u.start, u.stop))
            continue
        if ch != height or cw != width:
            raise PlanError(f"{u.label} covers whole images but the output of group {u.group!r} is chunked in "
                            f"{ch} x {cw} blocks; re-create the run directory with the same tiling")
        if u.stop <= u.start or u.start % k or u.stop != min(u.start + k, n):
            raise PlanError(
                f"{u.label} is not aligned to output chunks of {k} images (count {n}); two workers could write "
                "the same chunk. Re-create the run directory for this store."
            )
        covered.setdefault(u.group, []).append((u.start, u.stop))
    for (group, index), seen in blocks.items():
        _, ch, cw = chunks[group]
        _, height, width = counts[group]
        expected = math.ceil(height / ch) * math.ceil(width / cw)
        if len(seen) != expected:
            raise PlanError(f"group {group!r} image {index}: {len(seen)} unit(s) cover its {expected} blocks")
    counts = {g: c[0] for g, c in counts.items()}
    for group, n in counts.items():
        spans = sorted(covered.get(group, []))
        expected = 0
        for s, e in spans:
            if s != expected:
                raise PlanError(f"group {group!r}: images {expected}..{s - 1} have no unit or units overlap at {s}")
            expected = e
        if expected != n:
            raise PlanError(f"group {group!r}: images {expected}..{n - 1} have no unit")


def image_part(group: str, index: int) -> str:
    """Name of the table parts of one tiled image (its Dice rows, instances, seams): ``g001-000003``."""
    return f"{group}-{index:06d}"


@dataclass(frozen=True)
class RunPlan:
    """The recorded plan of a run: its work units (in order) and the tiling of its large images."""

    units: tuple[WorkUnit, ...]
    tiling: Tiling | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        """Store groups the plan covers, in order."""
        return tuple(dict.fromkeys(u.group for u in self.units))

    @property
    def tiled_images(self) -> list[tuple[str, int]]:
        """``(group, index)`` of every image segmented block by block, in plan order."""
        return list(dict.fromkeys((u.group, u.start) for u in self.units if u.window is not None))

    def blocks_of(self, group: str, index: int) -> list[WorkUnit]:
        """The block units of one tiled image, in plan order."""
        return [u for u in self.units if u.window is not None and (u.group, u.start) == (group, index)]

    def part_groups(self) -> dict[str, str]:
        """Store group of every table part: unit names and the parts of tiled images (:func:`image_part`)."""
        out = {u.name: u.group for u in self.units}
        out.update({image_part(g, i): g for g, i in self.tiled_images})
        return out

    def extends(self, earlier: "RunPlan") -> bool:
        """True when this plan keeps ``earlier``'s units unchanged and only adds units after them."""
        return self.units[:len(earlier.units)] == earlier.units

    def to_json(self) -> dict[str, Any]:
        return {"tiling": None if self.tiling is None else dataclasses.asdict(self.tiling),
                "units": [[u.unit_id, u.group, u.start, u.stop,
                           None if u.window is None else [u.window.y0, u.window.y1, u.window.x0, u.window.x1]]
                          for u in self.units]}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "RunPlan":
        units = tuple(WorkUnit(unit_id=i, group=g, start=s, stop=e, window=None if w is None else Window(*w))
                      for i, g, s, e, w in data["units"])
        tiling = data.get("tiling")
        return RunPlan(units=units, tiling=None if tiling is None else Tiling(**tiling))


def large_whole_groups(store: StoreInfo, tiling: Tiling | None) -> list[str]:
    """Of a run with ``tiling``, the groups of 2-D images larger than its model tile on a side and
    than one chunk of the store's ingest (its ``chunk_pixels``, 4.2 Mpx by default) that the store
    keeps whole (ingested with ``--tile-chunk 0``): tiling applies to tiled groups only, so these are
    segmented whole, one image per forward pass, with the memory that takes. Named as
    ``'g000 (3 image(s) of 3000 x 2500 px)'``."""
    from segcore.config import IngestSpec

    if tiling is None:
        return []
    large = store.spec.get("chunk_pixels") or IngestSpec.model_fields["chunk_pixels"].default
    return [f"{g.name} ({g.count} image(s) of {g.width} x {g.height} px)" for g in store.groups
            if not g.tile and g.volume is None and g.height * g.width > large and max(g.height, g.width) > tiling.tile]


def make_plan(store: StoreInfo, tiling: Tiling | None) -> RunPlan:
    """The plan of a run over ``store``: tiled groups are cut into blocks unless ``tiling`` is None."""
    return RunPlan(units=tuple(plan_units(store, tiled=tiling is not None)), tiling=tiling)


def resolve_tiling(meta: ModelMeta, *, tile_size: int | None, overlap: int | None, blend: str = "gaussian",
                   tta: bool = False) -> Tiling | None:
    """Tiling options for a model, defaults derived from it; None when ``tile_size`` is 0 (no tiling:
    large images are segmented whole).

    Semantic models: the model tile defaults to :data:`DEFAULT_TILE` (a volumetric model:
    :data:`DEFAULT_VOLUME_TILE` along each axis) rounded up to the UNet's
    divisor (``2**depth``), the overlap to a quarter of the tile (more than the receptive field of
    the default UNets). Instance models: the detector runs on cores of ``tile`` pixels (default
    :data:`DEFAULT_INSTANCE_TILE`) plus a halo of ``overlap`` pixels on each side (default
    :data:`DEFAULT_INSTANCE_OVERLAP`), which must exceed the largest object; keep the window small
    enough that it holds fewer objects than the model's ``box_detections_per_img``.
    """
    if tile_size == 0:
        return None
    if blend not in BLENDS:
        raise ConfigError(f"blend must be one of {BLENDS}, got {blend!r}")
    if meta.kind == "instance":
        tile = DEFAULT_INSTANCE_TILE if tile_size is None else int(tile_size)
        ov = DEFAULT_INSTANCE_OVERLAP if overlap is None else int(overlap)
        if tile < 1 or ov < 0:
            raise ConfigError(f"need tile size >= 1 and overlap >= 0 pixels, got {tile} and {ov}")
        if tta:
            raise ConfigError("test-time augmentation applies to semantic models only")
        return Tiling(tile=tile, overlap=ov, blend=blend, tta=False)
    divisor = 2 ** int(meta.arch_kwargs.get("depth", 4))
    default = DEFAULT_VOLUME_TILE if meta.spatial_dims == 3 else DEFAULT_TILE  # a volumetric model: 3-D tiles
    tile = default if tile_size is None else int(tile_size)
    if tile < 1:
        raise ConfigError(f"tile size must be >= 1 (or 0 to disable tiling), got {tile}")
    divisor = max(divisor, meta.input_multiple)
    tile = math.ceil(tile / divisor) * divisor
    ov = tile // 4 if overlap is None else int(overlap)
    if overlap is None and meta.halo:  # a package's halo: neighbours share at least twice that
        tile = max(tile, math.ceil((4 * meta.halo + 1) / divisor) * divisor)
        ov = max(tile // 4, 2 * meta.halo)
    if not 0 <= ov < tile:
        raise ConfigError(f"overlap must lie in [0, tile size {tile}), got {ov}")
    return Tiling(tile=tile, overlap=ov, blend=blend, tta=tta)


def effective_precision(meta: ModelMeta, precision: str, *, device: str) -> str:
    """The precision a run computes in: ``fp32`` on the CPU (``device="cpu"``), for instance models and
    for ONNX models; otherwise the requested autocast precision."""
    if device == "cpu" or meta.kind == "instance" or meta.runtime == "onnx":
        return "fp32"
    return precision


def output_shaping(meta: ModelMeta, tiling: Tiling | None, *, precision: str, tta: bool = False,
                   compiled: bool = False) -> dict[str, Any]:
    """The parameters besides the store and the checkpoint that shape a run's outputs: the tiling of
    large images (tile size, overlap, blend, TTA), the precision (give :func:`effective_precision`),
    TTA of whole images (``tta_whole_images``, present only when on: runs recorded before whole images
    had TTA keep their key, and a TTA run recorded then, whose whole images had none, is not
    resumed as if they had), ``compiled`` (present only when on: ``torch.compile``'s kernels may
    differ from eager ones in the last bits), and, from the checkpoint, its normalisation, score
    threshold and overlap threshold (the last present only when set; recorded to name them in
    messages, the checkpoint's sha256 already pins them)."""
    return {
        **({"tta_whole_images": True} if tta else {}),
        **({"compiled": True} if compiled else {}),
        "tile_size": None if tiling is None else tiling.tile,
        "overlap": None if tiling is None else tiling.overlap,
        "blend": None if tiling is None else tiling.blend,
        "tta": None if tiling is None else tiling.tta,
        "precision": precision,
        "normalisation": meta.normalisation.model_dump(mode="json"),
        "score_threshold": meta.arch_kwargs.get("score_threshold"),
        **({"overlap_threshold": meta.arch_kwargs["overlap_threshold"]}
           if meta.arch_kwargs.get("overlap_threshold") is not None else {}),
    }
