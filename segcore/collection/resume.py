"""An ingest's record of its work in progress, kept inside the store so that an interrupted ingest
resumes instead of starting again.

Layout, beside the arrays of ``STORE.zarr`` (removed once the manifest is written)::

    _ingest/plan.json              what the ingest writes: its sources as listed and probed, the groups
    _ingest/done/g000-000064.json  one per chunk written: the rows that chunk's write returned

The plan is written (atomically) once the store's arrays exist and before any chunk is written;
a chunk's marker is written (atomically) after its data. A re-run of the same ingest (same spec,
same files with the same size and modification stamps) reads the plan, keeps the chunks that have
a marker and writes only the others; nothing is probed or decoded again
(:func:`segcore.collection.ingest.start_ingest`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from segcore import fsio

log = logging.getLogger(__name__)

RECORD_DIR = "_ingest"
PLAN_NAME = "plan.json"
DONE_DIR = "done"
RECORD_FORMAT = 1

Row = dict[str, Any]

#: How a listed file is recognised: where it is and its (and its mask's) size and modification stamp.
_IDENTITY = ("source_path", "source_signature", "mask_path", "mask_signature")


@dataclass(frozen=True)
class IngestRecord:
    """The plan of an ingest, as recorded in its store.

    ``kind``: "create" (a new store) or "append" (a batch of an incremental ingest). ``listed``:
    the identity of every file the ingest listed (:data:`_IDENTITY`, URLs for staged files);
    ``planned``: the probed rows with ``group``/``index`` (errors: group None); ``groups``: the
    groups to write, as dicts of :class:`segcore.collection.store.GroupInfo`; ``probed``: the rows
    hashed by an append (to refresh the old manifest's signatures again); ``fingerprint``: the
    store's fingerprint before an append.
    """

    kind: str
    spec: dict[str, Any]
    listed: tuple[tuple[Any, ...], ...]
    planned: tuple[Row, ...]
    groups: tuple[dict[str, Any], ...]
    batch: int = 0
    groups_before: int = 0
    probed: tuple[Row, ...] = ()
    fingerprint: dict[str, Any] | None = None


def identity(rows: Sequence[Row]) -> tuple[tuple[Any, ...], ...]:
    """The sorted identity tuples of listed rows (a staged row by its URLs)."""
    out = []
    for r in rows:
        src = dict(r, source_path=r.get("source_url", r["source_path"]), mask_path=r.get("mask_url", r.get("mask_path")))
        out.append(tuple(src.get(k) for k in _IDENTITY))
    return tuple(sorted(out, key=lambda t: tuple("" if v is None else str(v) for v in t)))


def differences(record: IngestRecord, rows: Sequence[Row]) -> list[str]:
    """What differs between the files of ``record`` and the listed ``rows``, in words (empty: the same
    files, unchanged). A file behind a URL without a modification stamp cannot be shown unchanged: it
    differs. A local path without one (a dangling symlink, listed as an error row) is unchanged while
    it stays without one."""
    before = {t[0]: t for t in record.listed}
    now = {t[0]: t for t in identity(rows)}
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    changed = sorted(p for p in set(now) & set(before)
                     if now[p] != before[p] or (now[p][1] is None and "://" in str(p)))
    out = []
    for what, paths in (("new", added), ("gone", removed), ("changed", changed)):
        if paths:
            out.append(f"{len(paths)} {what} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})")
    return out


def _dir(store: str) -> str:
    return fsio.join(store, RECORD_DIR)


def write_plan(store: str, record: IngestRecord) -> None:
    """Record ``record`` as the plan of the ingest into ``store``, forgetting any earlier plan and its markers."""
    clear(store)
    payload = {"format": RECORD_FORMAT, "kind": record.kind, "spec": record.spec,
               "listed": [list(t) for t in record.listed], "planned": list(record.planned),
               "groups": list(record.groups), "batch": record.batch, "groups_before": record.groups_before,
               "probed": list(record.probed), "fingerprint": record.fingerprint}
    fsio.write_bytes(fsio.join(_dir(store), PLAN_NAME), json.dumps(payload).encode())


def read_plan(store: str) -> IngestRecord | None:
    """The recorded plan of an unfinished ingest into ``store``; None when there is none (or it cannot be read)."""
    path = fsio.join(_dir(store), PLAN_NAME)
    try:
        payload = json.loads(fsio.read_bytes(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("the ingest plan %s cannot be read (%s); the ingest starts again", path, exc)
        return None
    if payload.get("format", 0) > RECORD_FORMAT:
        return None
    return IngestRecord(kind=payload["kind"], spec=payload["spec"], listed=tuple(tuple(t) for t in payload["listed"]),
                        planned=tuple(payload["planned"]), groups=tuple(payload["groups"]), batch=payload["batch"],
                        groups_before=payload["groups_before"], probed=tuple(payload["probed"]),
                        fingerprint=payload["fingerprint"])


def chunk_key(rows: Sequence[Row]) -> str:
    """The name of a chunk's marker: its group and first image index (``g000-000064``)."""
    return f"{rows[0]['group']}-{int(rows[0]['index']):06d}"


def mark_done(store: str, rows: Sequence[Row]) -> None:
    """Record that the chunk of ``rows`` (the rows its write returned) is written; nothing without a plan
    (a chunk written outside an ingest)."""
    if not rows or not fsio.exists(fsio.join(_dir(store), PLAN_NAME)):
        return
    fsio.write_bytes(fsio.join(_dir(store), DONE_DIR, f"{chunk_key(rows)}.json"), json.dumps(list(rows)).encode())


def done_chunks(store: str) -> dict[str, list[Row]]:
    """``{chunk key: rows}`` of the chunks marked written (hidden temporary files are not markers)."""
    found = fsio.list_files(fsio.join(_dir(store), DONE_DIR), suffix=".json", recursive=False)
    return {loc.rsplit("/", 1)[-1][:-len(".json")]: json.loads(data) for loc, data in zip(found, fsio.read_many(found))}


def clear(store: str) -> None:
    """Forget the plan and markers (the ingest finished, or starts again)."""
    fs, path = fsio.url_to_fs(_dir(store))
    if fs.exists(path):
        fs.rm(path, recursive=True)
