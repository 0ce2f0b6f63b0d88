"""The class colours shared by the figures (RGB thumbnails, histograms) and the NGFF label metadata.

Class 0 (background) has no colour; class ``k >= 1`` gets ``CLASS_COLOURS[(k - 1) % 10]``, so a
class looks the same in a gallery thumbnail and in an NGFF viewer opening the run's masks.
"""

from __future__ import annotations

#: Foreground class colours (RGB, 0-255, class 1 first).
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)
#: Plain-English names of :data:`CLASS_COLOURS`, in the same order (for legends).
COLOUR_NAMES: tuple[str, ...] = ("red", "green", "yellow", "blue", "orange", "purple", "cyan", "magenta", "lime",
                                 "pink")


def class_colour(class_id: int) -> tuple[int, int, int]:
    """RGB colour of foreground class ``class_id`` (>= 1); the palette repeats after 10 classes."""
    return CLASS_COLOURS[(class_id - 1) % len(CLASS_COLOURS)]


def colour_name(class_id: int) -> str:
    """Name of :func:`class_colour` ``(class_id)`` (``"red"`` for class 1)."""
    return COLOUR_NAMES[(class_id - 1) % len(COLOUR_NAMES)]
