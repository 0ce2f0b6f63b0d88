"""The record of an ingest (:class:`IngestResult`, the flow's return value) and the words of its note."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

Row = dict[str, Any]


@dataclass(frozen=True)
class IngestResult:
    """What an ingest did. ``note``: the same in words, for the log (not part of :meth:`to_dict`)."""

    store: str
    files: int  # files found (paired) in the source directory or landing zone
    new_files: int  # files taken in: all of them when the store is created, the new ones when appending
    images: int  # images decoded into new slots
    errors: int  # new files that could not be decoded
    groups: int  # groups of the store afterwards
    chunks: int | None  # chunks written by this run (None: an identical store was reused)
    superseded: int | None = None  # older versions superseded (None: not an incremental ingest)
    hashed: int | None = None  # files read and hashed (None: neither an append nor a resume)
    batch: int | None = None  # the batch appended (None: nothing was appended)
    reused: bool = False  # an existing store with the same files and options was kept
    resumed: int | None = None  # chunks an interrupted ingest had written, kept (None: not a resume)
    decoded: int | None = None  # files decoded by this run (None: not a resume; then all new files)
    skipped: int = 0  # files of the image directory with other suffixes, left out (see list_sources)
    constant_images: int = 0  # decoded images whose pixels all have one value (kept; see constant_note)
    note: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The flow's return value: every field, less ``note`` and the optional ones left unset (or 0)."""
        out = {k: v for k, v in asdict(self).items() if k != "note"}
        for k in ("superseded", "hashed", "batch", "resumed", "decoded"):
            if out[k] is None:
                del out[k]
        for k in ("skipped", "constant_images"):
            if not out[k]:
                del out[k]
        if not self.reused:
            del out["reused"]
        return out


def count_files(rows: Sequence[Row]) -> int:
    """Source files among ``rows`` (a volume has a row per slice)."""
    return len({r["source_path"] for r in rows})


def volume_note(rows: Sequence[Row]) -> str:
    """``" (96 slices of 1 volume)"`` for the readable volume slices among ``rows``; ``""`` for none."""
    volumes = {r["volume_id"] for r in rows if r.get("volume_id") and r["status"] == "ok"}
    if not volumes:
        return ""
    n = sum(1 for r in rows if r.get("volume_id") in volumes and r["status"] == "ok")
    return f" ({n} slices of {len(volumes)} volume(s))"


def constant_note(rows: Sequence[Row]) -> str:
    """``"; 2 constant image(s) kept (every pixel one value; 1 all zero): a, b"`` for decoded rows
    whose ``value_min`` equals ``value_max`` (empty and flat images are valid input; the note
    only says that their masks are likely empty); ``""`` for none."""
    if not rows:
        return ""
    zero = sum(1 for r in rows if r["value_max"] == 0)
    ids = ", ".join(str(r["image_id"]) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
    return f"; {len(rows)} constant image(s) kept (every pixel one value; {zero} all zero): {ids}"
