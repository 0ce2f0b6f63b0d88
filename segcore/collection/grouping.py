"""Image ids grouped by a regular expression: slices of one scan for a validation split
(``--group-pattern``), slices exported as 2-D files scored as one volume (``--volume-pattern``).

The group of an id is the pattern's first capture group, or its whole match when it has none,
found anywhere in the id (:func:`re.search`). Ids sort in natural order (:func:`natural_key`:
``z9`` before ``z10``), so unpadded slice numbers keep their order.
"""

from __future__ import annotations

import re

from segcore.errors import ConfigError


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``z9`` before ``z10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def compile_pattern(pattern: str, *, what: str = "group pattern") -> re.Pattern[str]:
    """``pattern`` compiled; :class:`ConfigError` naming ``what`` for an invalid expression."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what} {pattern!r} is not a regular expression: {exc}") from exc


def group_of(rx: re.Pattern[str], image_id: str) -> str | None:
    """The group ``rx`` names in ``image_id`` (first capture group, else the whole match); None
    when it does not match."""
    m = rx.search(image_id)
    if m is None:
        return None
    return m.group(1) if rx.groups else m.group(0)


__all__ = ["compile_pattern", "group_of", "natural_key"]
