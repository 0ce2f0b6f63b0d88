"""Safe extraction of zip archives (model packages from elsewhere).

:func:`safe_extract_zip` checks every member before writing anything: a member whose name is
absolute (``/etc/x``, ``C:\\x``), climbs out of the target (``../x``, ``a/../../x``) or is a
symbolic link is refused with :class:`UnsafeArchive`, and then nothing at all is written. Members
are written as plain files under the target only.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from segcore.errors import SegflowError

#: Most bytes an archive may expand to (guards against zip bombs).
MAX_EXTRACTED_BYTES = 4 << 30


class UnsafeArchive(SegflowError, ValueError):
    """An archive member would be written outside the target, or is a link."""


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if "\\" in name or PureWindowsPath(name).drive or PurePosixPath(name).is_absolute():
        return "has an absolute path (or a backslash)"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the target folder ('..')"
    if "\x00" in name:
        return "has a NUL byte in its name"
    return None


def check_zip(path: str | os.PathLike[str]) -> list[zipfile.ZipInfo]:
    """The members of the zip file ``path``, after checking that every one is safe to extract.

    Raises :class:`UnsafeArchive` naming the first unsafe member, or saying that the file is not
    a zip archive, or that it would expand to more than :data:`MAX_EXTRACTED_BYTES`.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise UnsafeArchive(f"{os.fspath(path)!r} is not a zip archive: {exc}") from exc
    total = 0
    for info in members:
        problem = _member_problem(info)
        if problem is not None:
            raise UnsafeArchive(f"refusing {os.fspath(path)!r}: member {info.filename!r} {problem}; nothing was "
                                "extracted. Repack the archive with relative paths inside one folder.")
        total += info.file_size
    if total > MAX_EXTRACTED_BYTES:
        raise UnsafeArchive(f"refusing {os.fspath(path)!r}: it expands to {total} bytes, more than "
                            f"{MAX_EXTRACTED_BYTES}")
    return members


def safe_extract_zip(path: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Extract the zip file ``path`` into the folder ``target`` (created); returns ``target``.

    Every member is checked first (:func:`check_zip`); an unsafe one means nothing is written.
    Each resolved destination is checked again to lie under ``target``.
    """
    members = check_zip(path)
    root = Path(target)
    root.mkdir(parents=True, exist_ok=True)
    resolved_root = root.resolve()
    with zipfile.ZipFile(path) as zf:
        for info in members:
            dest = (root / info.filename).resolve()
            if dest != resolved_root and resolved_root not in dest.parents:
                raise UnsafeArchive(f"refusing member {info.filename!r} of {os.fspath(path)!r}: it resolves to "
                                    f"{str(dest)!r}, outside {str(resolved_root)!r}")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return root


__all__ = ["MAX_EXTRACTED_BYTES", "UnsafeArchive", "check_zip", "safe_extract_zip"]
