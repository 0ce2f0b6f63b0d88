"""Out-of-memory back-off of a step's forward passes, inside the worker.

A unit or block whose forward raises ``torch.cuda.OutOfMemoryError`` or ``MemoryError`` frees the
cached memory and runs again with half the batch (down to 1 image or tile per pass), then, for
tiled blocks, half the tile (down to :func:`smallest_tile`); the batch and tile it finished with
are recorded in its done-record. The step's outputs are those of a run started with that batch and
tile (on the CPU bit for bit: a batch changes no value there; on CUDA the kernels chosen for another
batch size may differ in the last bits). A tile halved keeps the overlap and stays a multiple of
the model's size divisor, so the block's values are those of a run with the smaller tile, not the
run key's.

:class:`Faults` is the test hook: a run context carrying one raises an out-of-memory error on
purpose for every forward pass over more pixels than ``oom_pixels``, or sleeps in given units.
segcore never reads the environment; the task layer builds it (``SEGFLOW_FAULTS``).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from segcore.errors import SegflowError
from segcore.models.checkpoint import ModelMeta

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The errors that start a back-off.
OUT_OF_MEMORY: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError, MemoryError)

#: Smallest detector core (instance models) a back-off goes down to, in pixels.
MIN_DETECT_TILE = 32


class OutOfMemory(SegflowError, MemoryError):
    """A step ran out of memory even with a batch of 1 and the smallest tile."""


@dataclass(frozen=True)
class Faults:
    """Faults a run injects on purpose (tests only; empty by default).

    ``oom_pixels``: every forward pass over more than this many pixels (images or tiles times their
    height times width) raises ``torch.cuda.OutOfMemoryError``. ``hang_units``: unit names whose step
    sleeps ``hang_s`` seconds before it starts (a hung unit).
    """

    oom_pixels: int | None = None
    hang_units: tuple[str, ...] = ()
    hang_s: float = 0.0

    def check_forward(self, *, images: int, height: int, width: int) -> None:
        """Raise the injected out-of-memory error when a pass over ``images`` of ``height`` x ``width`` exceeds it."""
        if self.oom_pixels is not None and images * height * width > self.oom_pixels:
            raise torch.cuda.OutOfMemoryError(
                f"injected: {images} x {height} x {width} px exceeds {self.oom_pixels} px per pass")

    def hang(self, unit_name: str) -> None:
        """Sleep ``hang_s`` seconds when ``unit_name`` is one of ``hang_units``."""
        if unit_name in self.hang_units:
            log.warning("unit %s hangs for %.0f s (injected)", unit_name, self.hang_s)
            time.sleep(self.hang_s)


def free_memory(device: str) -> None:
    """Collect garbage and, on CUDA, return torch's cached blocks to the device."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def tile_multiple(meta: ModelMeta) -> int:
    """The side every semantic tile must be a multiple of (the UNet's divisor, or the model's input multiple)."""
    return max(2 ** int(meta.arch_kwargs.get("depth", 4)) if meta.arch in ("unet", "unet3d") else 1, meta.input_multiple)


def smallest_tile(*, multiple: int, overlap: int) -> int:
    """Smallest tile a back-off goes down to: a multiple of ``multiple``, at least twice it, larger than twice
    ``overlap`` (tiles start every ``tile - overlap`` px: a tile barely above the overlap would multiply the
    tiles of a block many times over)."""
    return max(2 * multiple, (2 * overlap // multiple + 1) * multiple)


def halve(batch: int, tile: int | None, *, multiple: int = 1, min_tile: int = 1) -> tuple[int, int | None] | None:
    """The next smaller ``(batch, tile)``: half the batch while above 1, then half the tile (rounded down to
    ``multiple``, not below ``min_tile``); None when neither can shrink. ``tile`` None: untiled."""
    if batch > 1:
        return batch // 2, tile
    if tile is not None:
        smaller = max(min_tile, (tile // 2) // multiple * multiple)
        if smaller < tile:
            return 1, smaller
    return None


def with_backoff(attempt: Callable[[int, int | None], T], *, batch: int, tile: int | None = None, multiple: int = 1,
                 min_tile: int = 1, device: str = "cpu", what: str = "step") -> tuple[T, int, int | None]:
    """``attempt(batch, tile)``, retried after an out-of-memory error with :func:`halve`'s smaller sizes.

    Returns ``(result, batch, tile)``: the result and the sizes it was computed with. Raises
    :class:`OutOfMemory` when a batch of 1 at the smallest tile still does not fit.
    """
    while True:
        try:
            return attempt(batch, tile), batch, tile
        except OUT_OF_MEMORY as exc:
            error = f"{exc}".splitlines()[0] if f"{exc}" else type(exc).__name__
        free_memory(device)  # outside the handler: the traceback's frames (and their tensors) are gone
        smaller = halve(batch, tile, multiple=multiple, min_tile=min_tile)
        if smaller is None:
            raise OutOfMemory(f"{what} runs out of memory on {device} even with a batch of {batch}"
                              f"{f' and tiles of {tile} px' if tile else ''} ({error}); run fewer workers per "
                              "device or use a device with more memory")
        log.warning("%s: out of memory on %s with a batch of %d%s; retrying with %d%s", what, device, batch,
                    f", tile {tile} px" if tile else "", smaller[0], f", tile {smaller[1]} px" if tile else "")
        batch, tile = smaller
