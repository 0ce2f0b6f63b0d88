"""Paths or fsspec URLs: one small API for every writer and reader of outputs.

A *location* is a local path (``runs/demo``), a ``file://`` URL or any fsspec URL
(``s3://bucket/lake``, ``memory://x``). Credentials and endpoints come from the usual places
of the filesystem's library (for S3: ``AWS_*`` environment variables such as
``AWS_ENDPOINT_URL``, ``~/.aws``), or from fsspec's configuration (``FSSPEC_S3_*`` variables);
segflow passes no secrets around.

Writes are all-or-nothing for readers: on a local filesystem a file is written under a hidden
temporary name (starting with '.') and renamed; on object stores one PUT creates the object whole.
Dataset readers (pyarrow, DuckDB, pandas) skip hidden names, so they never see a partial file.

Other processes (Dask workers) write into the same locations, so remote filesystems are opened
without a listings cache (see :func:`url_to_fs`): listings and existence checks ask the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem



def file_sha256(location: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks), at a path or an fsspec URL. A directory
    (a Zarr source) hashes the relative paths and contents of all its files, in sorted order."""
    fs, path = url_to_fs(location)
    local = isinstance(fs, LocalFileSystem)
    h = hashlib.sha256()
    if os.path.isdir(path) if local else fs.isdir(path):
        for rel, full in tree(location):
            h.update(rel.encode() + b"\0" + file_sha256(full).encode())
        return h.hexdigest()
    with (open(path, "rb") if local else fs.open(path, "rb")) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree(location: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(relative path, location)`` of every file below a directory (hidden names included), sorted by
    relative path; the locations are plain paths for a local directory, URLs otherwise."""
    fs, path = url_to_fs(location)
    if isinstance(fs, LocalFileSystem):
        return _tree(path)
    root = path.rstrip("/")
    found = [p[len(root):].lstrip("/") for p in fs.find(root)]
    return sorted((rel, join(location, rel)) for rel in found if rel)


def _tree(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(relative path, path)`` of every file under a local directory, sorted."""
    out = []
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
    return sorted(out)


def local_path(location: str | os.PathLike[str]) -> str | None:
    """The plain path of a local location (a path or a ``file://`` URL); None for other filesystems."""
    fs, path = url_to_fs(location)
    return path if isinstance(fs, LocalFileSystem) else None


#: The parts of URLs that authenticate rather than locate, as regular expressions (Python's ``re``
#: and RE2 alike, so that SQL can apply them too: :data:`segcore.lake.publish.PUBLIC_STORE_SQL`):
#: the user and password before the host, and the query and fragment (signed URLs carry tokens
#: there), up to white space or a quote (a URL inside a command line).
URL_CREDENTIALS = r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#'\"]*@"
URL_QUERY = r"([A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*"


def without_secrets(text: str | os.PathLike[str]) -> str:
    """``text`` fit to be recorded where others read it: every URL in it (a location, or a command
    line that holds some) without its user and password (``s3://key:secret@bucket/...``), query
    and fragment; a plain path as it is."""
    text = os.fspath(text)
    if "://" not in text:
        return text
    return re.sub(URL_QUERY, r"\1", re.sub(URL_CREDENTIALS, r"\1", text))


def write_problem(location: str | os.PathLike[str], *, folder: bool) -> str | None:
    """Why ``location`` cannot be written as a folder (``folder``) or a file, or None when it can:
    it is a file where a folder is wanted (or the reverse), or the folder it would be made in lies
    under a file or forbids writing. Remote locations are not checked (None): their store tells
    when written. For checking an output's place before the work that fills it."""
    path = local_path(location)
    if path is None:
        return None
    p = Path(path)
    if p.exists():
        if folder != p.is_dir():
            return f"{path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}"
        where = p if folder else p.parent
        return None if os.access(where, os.W_OK | os.X_OK) else f"{where} does not allow writing"
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, so nothing can be made under it"
            return None if os.access(parent, os.W_OK | os.X_OK) else f"{parent} does not allow writing"
    return None


def new_file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` gives a new file: ``0o666`` less the process's
    umask (read from ``/proc/self/status`` where there is one, without changing it; else 022). For
    files a library writes with ``0o600`` (safetensors does), so that the group can read a model
    as it reads the other outputs."""
    try:
        with open("/proc/self/status") as status:
            umask = next((int(line.split()[1], 8) for line in status if line.startswith("Umask:")), 0o022)
    except OSError:
        umask = 0o022
    return 0o666 & ~umask


@contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``, else remove it.

    The temporary name starts with '.', so dataset readers that skip hidden files never see a
    half-written file, and a reader of ``dest`` sees either the old or the new file, whole.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def url_to_fs(location: str | os.PathLike[str]) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` of a location.

    Remote filesystems are opened without a listings cache: other processes and threads add files
    all the time, and a cached listing of a directory makes a file written since look absent
    (``isfile`` answers from the cache, so a reader would fail to open a part it has just listed).
    """
    loc = os.fspath(location)
    if "://" in loc and not loc.startswith("file://"):
        return fsspec.core.url_to_fs(loc, use_listings_cache=False)
    return fsspec.core.url_to_fs(loc)


def is_local(location: str | os.PathLike[str]) -> bool:
    return isinstance(url_to_fs(location)[0], LocalFileSystem)


def absolute(location: str | os.PathLike[str]) -> str:
    """A plain path made absolute (symlinks kept, like ``os.path.abspath``); a URL as it is."""
    text = os.fspath(location)
    return text if "://" in text else os.path.abspath(text)


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """``location/part/...`` keeping the URL scheme (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    base = os.fspath(location).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts if p)])


def exists(location: str | os.PathLike[str]) -> bool:
    fs, path = url_to_fs(location)
    return fs.exists(path)


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` so that a reader sees the old file or the new one, never a partial one."""
    fs, path = url_to_fs(location)
    if isinstance(fs, LocalFileSystem):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    else:
        fs.pipe_file(path, data)


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    fs, path = url_to_fs(location)
    return fs.cat_file(path)


def write_json(location: str | os.PathLike[str], payload: Any) -> None:
    write_bytes(location, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(location: str | os.PathLike[str]) -> Any:
    return json.loads(read_bytes(location))


def list_entries(location: str | os.PathLike[str], *, suffix: str = "",
                 recursive: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """``(full location, fsspec info)`` of the visible files below ``location``, sorted by location
    (same scheme as ``location``).

    Names starting with '.' or '_' (temporary and bookkeeping files) are left out; a missing
    location lists nothing. The infos come from the listing itself (on object stores one request
    per page of 1,000 keys, not one per file); see :func:`info_signature`.
    """
    fs, path = url_to_fs(location)
    if not fs.exists(path):
        return []
    if recursive:
        found = list(fs.find(path, detail=True).items())
    else:
        found = [(e["name"], e) for e in fs.ls(path, detail=True) if e.get("type") == "file"]
    base = os.fspath(location).rstrip("/")
    root = path.rstrip("/")
    out = []
    for p, info in found:
        rel = p[len(root):].lstrip("/") if p.startswith(root) else p
        if any(part.startswith((".", "_")) for part in rel.split("/")) or not rel.endswith(suffix):
            continue
        out.append((join(base, rel), info))
    return sorted(out, key=lambda e: e[0])


def list_files(location: str | os.PathLike[str], *, suffix: str = "", recursive: bool = True) -> list[str]:
    """Sorted full locations of the visible files below ``location`` (see :func:`list_entries`)."""
    return [loc for loc, _ in list_entries(location, suffix=suffix, recursive=recursive)]


def to_buffer(write: Any) -> bytes:
    """Bytes written by ``write(file_object)``, e.g. ``to_buffer(lambda f: pq.write_table(t, f))``."""
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()


def read_many(locations: Sequence[str]) -> list[bytes]:
    """Bytes of several files of one filesystem, in order; fetched concurrently where the filesystem can
    (one round trip each on object stores, not one after another)."""
    if not locations:
        return []
    fs = url_to_fs(locations[0])[0]
    paths = [url_to_fs(loc)[1] for loc in locations]
    got = fs.cat(paths)
    return [got[p] for p in paths]


def signature(location: str | os.PathLike[str]) -> str | None:
    """``"<size>:<modification stamp>"`` of a file (mtime in ns locally; the ETag or last-modified
    time on object stores), or None when the filesystem gives no stamp or the file is gone.

    Equal signatures mean "very likely the same bytes" (the quick check of rsync and make): an
    incremental ingest does not hash a file again whose signature it recorded with its hash.
    """
    fs, path = url_to_fs(location)
    try:
        if isinstance(fs, LocalFileSystem) and os.path.isdir(path):  # a Zarr source: its files' sizes and stamps
            stats = [os.stat(full) for _, full in _tree(path)]
            return f"{sum(st.st_size for st in stats)}:{len(stats)}:{max((st.st_mtime_ns for st in stats), default=0)}"
        if isinstance(fs, LocalFileSystem):
            st = os.stat(path)
            return f"{st.st_size}:{st.st_mtime_ns}"
        return info_signature(fs.info(path))
    except OSError:
        return None


def info_signature(info: dict[str, Any]) -> str | None:
    """:func:`signature` from the fsspec info of a remote file (as :func:`list_entries` gives it)."""
    stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or info.get("created")
    return f"{info.get('size')}:{stamp}" if stamp is not None else None
