"""How long a work unit may run before it counts as hung, and how long to wait before trying it again.

The flow measures the seconds per image of the units finished so far in the run and gives each
unit ``factor`` times the median of them times its images, clamped to ``[floor, cap]``; before
any unit has finished, a unit gets ``cap``. A unit that fails or passes its timeout is tried
again after :func:`retry_delay` seconds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

#: A unit's timeout in units of its expected time (the median seconds per image times its images).
TIMEOUT_FACTOR = 5.0
#: Seconds before the first retry; each further retry waits twice as long.
FIRST_RETRY_DELAY = 2.0


def retry_delay(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt`` (2, 3, ...): 2 s, 4 s, 8 s, ..."""
    return FIRST_RETRY_DELAY * 2 ** max(0, attempt - 2)


@dataclass
class UnitTimeouts:
    """Per-unit timeouts from the seconds per image measured in this run.

    Args:
        floor, cap: least and most seconds a unit is given (cap also before any measurement).
        factor: the timeout in units of the expected time.
    """

    floor: float
    cap: float
    factor: float = TIMEOUT_FACTOR
    per_image: list[float] = field(default_factory=list)
    _median: float | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.floor <= self.cap:
            raise ValueError(f"need 0 < floor <= cap seconds, got floor {self.floor} and cap {self.cap}")

    def measured(self, *, seconds: float, images: float) -> None:
        """Record a finished unit: its wall-clock ``seconds`` over ``images`` images (or blocks, each its
        share of a whole block)."""
        if images > 0 and seconds >= 0:
            self.per_image.append(seconds / images)
            self._median = None

    def timeout(self, images: float) -> float:
        """Seconds a unit of ``images`` images (or blocks) may run (at least one image's worth)."""
        if not self.per_image:
            return self.cap
        if self._median is None:  # asked about every step in flight at every look: computed once per change
            self._median = statistics.median(self.per_image)
        expected = self.factor * self._median * max(1, images)
        return min(self.cap, max(self.floor, expected))
