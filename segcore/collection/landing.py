"""Landing zones and collections at fsspec URLs (``s3://bucket/landing``): list, stage, map back.

The decoders read local files, so files behind a URL are first copied ("staged") into a local
directory that the ingest's workers share (``<store>.staging``, removed when the ingest ends);
they are hashed and decoded there, and the manifest records their URLs. Files whose size and
modification stamp are unchanged since their ingest are not staged at all
(:func:`segcore.collection.incremental.unchanged_sources`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from segcore import fsio
from segcore.errors import NotFound
from segcore.collection.imageio import SOURCE_SUFFIXES, file_suffix, without_suffix


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URL of a filesystem other than the local one."""
    return "://" in os.fspath(location) and not fsio.is_local(location)


def list_remote_images(location: str) -> list[tuple[str, str, str | None]]:
    """``[(url, image_id, signature)]`` of the image files directly inside ``location`` (like a
    local directory: not recursive, hidden files skipped, image suffixes only), sorted by URL. The
    signatures (:func:`segcore.fsio.signature`) come from the listing: no request per file."""
    files = [(u, info) for u, info in fsio.list_entries(location, recursive=False)
             if file_suffix(u) in SOURCE_SUFFIXES]
    if not files:
        raise NotFound(f"no image files in {location} (looked for {', '.join(sorted(SOURCE_SUFFIXES))}); "
                       "check the URL, the credentials in the environment and the file suffixes")
    return [(u, without_suffix(posixpath.basename(u)), fsio.info_signature(info)) for u, info in files]


def staging_dir(store: str) -> Path:
    """Local directory where the files of an ingest into ``store`` are staged: ``<store>.staging`` beside a
    local store; for a store at a URL, a directory of the system's temporary directory named after it."""
    if fsio.is_local(store):
        return Path(f"{fsio.local_path(store)}.staging")
    digest = hashlib.sha256(os.fspath(store).rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"segflow-staging-{digest}"


def stage_rows(rows: Sequence[dict[str, Any]], directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Copy the remote ``source_path``/``mask_path`` of ``rows`` into ``directory``.

    Returns new rows whose paths are the local copies, with the URLs kept in ``source_url`` and
    ``mask_url``. A file that cannot be fetched becomes an error row (the others go on).
    """
    out = []
    for r in rows:
        row = dict(r)
        for key, sub in (("source_path", "images"), ("mask_path", "masks")):
            url = row.get(key)
            if url is None or not is_remote(url):
                continue
            local = Path(directory) / sub / posixpath.basename(url)
            try:
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(fsio.read_bytes(url))
            except (OSError, ValueError) as exc:
                if key == "source_path":
                    row.update(status="error", error=f"cannot fetch {url}: {type(exc).__name__}: {exc}")
                else:  # no signature either: the next run fetches it again
                    row.update(mask_path=None, mask_status="missing", mask_signature=None)
                continue
            row[key.replace("_path", "_url")] = url
            row[key] = str(local)
        out.append(row)
    return out


def unstage_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their URLs back in ``source_path``/``mask_path`` (for the manifest)."""
    out = []
    for r in rows:
        row = dict(r)
        if "source_url" in row:
            row["source_path"] = row.pop("source_url")
        if "mask_url" in row:
            row["mask_path"] = row.pop("mask_url")
        out.append(row)
    return out


def remove_staging(store: str) -> None:
    shutil.rmtree(staging_dir(store), ignore_errors=True)
