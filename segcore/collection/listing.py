"""Listing the source files of a collection: which entries are images, which only look like one.

A directory is listed non-recursively, hidden entries (leading ``.``) aside; anything else is a
glob pattern (``**`` recurses; a plain file path matches itself). An entry whose suffix is in
:data:`~segcore.collection.imageio.SOURCE_SUFFIXES` (2-D images and volumes) is either

- an image *file*: a regular file, or a symbolic link to one, or
- a *problem*: named like an image but not something a decoder can open (a directory, a
  dangling symbolic link, a FIFO, socket or device); :func:`list_sources` gives the reason, so
  that the ingest records it as an error row instead of dropping it without a word.

A regular file of a directory with another suffix (``notes.txt``) is *skipped*, and counted.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from segcore.collection.imageio import SOURCE_SUFFIXES, file_suffix, without_suffix
from segcore.collection.dicom import is_dicom_series
from segcore.collection.zarr_source import is_zarr_source
from segcore.errors import ConfigError, NotFound

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Listing:
    """What :func:`list_sources` found, each part sorted by path.

    ``files``: image files to probe; ``problems``: ``(path, reason)`` of entries named like images
    that cannot be read as files; ``skipped``: regular files of a listed directory whose suffix is
    not an image suffix (a glob pattern skips nothing: it names what it wants).
    """

    files: tuple[Path, ...]
    problems: tuple[tuple[Path, str], ...]
    skipped: tuple[Path, ...]


def list_sources(dir_or_glob: str | os.PathLike[str]) -> Listing:
    """List a directory or glob pattern into image files, problem entries and skipped files.

    Sorting is lexicographic (``img10`` before ``img2``). Raises :class:`NotFound` when no entry
    is named like an image (neither a file nor a problem).
    """
    target = Path(dir_or_glob)
    is_dir = target.is_dir()
    if is_dir:
        candidates = [child for child in target.iterdir() if not child.name.startswith(".")]
        where = f"directory {target}"
    else:
        candidates = [Path(match) for match in glob.glob(os.fspath(dir_or_glob), recursive=True)]
        where = f"pattern {os.fspath(dir_or_glob)!r}"
    files, problems, skipped = [], [], []
    for p in sorted(candidates):
        if file_suffix(p) not in SOURCE_SUFFIXES and not is_dicom_series(p):
            if is_dir and p.is_file():
                skipped.append(p)
            continue
        reason = entry_problem(p)
        if reason is None:
            files.append(p)
        else:
            problems.append((p, reason))
    if not files and not problems:
        suffixes = ", ".join(sorted(SOURCE_SUFFIXES))
        if not any(ch in os.fspath(dir_or_glob) for ch in "*?[") and not target.exists():
            raise NotFound(f"{target} does not exist; give a directory of images or a glob pattern")
        raise NotFound(
            f"no image files in {where} (looked for {suffixes}; hidden files are skipped); "
            "check the path and the file suffixes"
        )
    if skipped:
        logger.info("skipped %d file(s) in %s whose suffix is not an image suffix: %s", len(skipped), where,
                    ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    logger.debug("found %d image(s) and %d problem entries in %s", len(files), len(problems), where)
    return Listing(files=tuple(files), problems=tuple(problems), skipped=tuple(skipped))


def list_images(dir_or_glob: str | os.PathLike[str]) -> list[Path]:
    """The image files of a directory or glob pattern (see :func:`list_sources`), sorted by path;
    problem entries and other suffixes left out. Raises :class:`NotFound` when there is none."""
    listing = list_sources(dir_or_glob)
    if not listing.files:
        first, reason = listing.problems[0]
        raise NotFound(f"no image files in {dir_or_glob}: {len(listing.problems)} entries are named like images but "
                       f"cannot be read (first: {first}: {reason})")
    return list(listing.files)


def entry_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` (named like an image) is not a file a decoder can open, or None when it is one.

    Symbolic links are followed: a link to a regular file is fine; a link whose target is missing
    is a problem that names the target.
    """
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        if p.is_symlink():
            return (f"symbolic link to {os.readlink(p)}, which does not exist; fix the link or remove it from the "
                    "image folder")
        return "it disappeared while the folder was listed; run the ingest again"
    except OSError as exc:  # a loop of links, a path component that cannot be searched
        return f"cannot be opened: {exc.strerror or exc}; fix its permissions or remove it"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode) and (is_zarr_source(p) or is_dicom_series(p)):  # Zarr, or a DICOM series: one source
        return None
    if stat.S_ISDIR(mode) and p.suffix.lower() == ".zarr":
        return "a directory named .zarr without Zarr metadata (zarr.json, .zarray or .zgroup); fix or remove it"
    if stat.S_ISDIR(mode):
        return "a directory, not an image file; rename it or move it out of the image folder"
    return "not a regular file (a FIFO, socket or device); remove it from the image folder"


def image_id_for(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """Return the stable id of an image: its path relative to ``root`` without its suffix.

    Separators are always ``/`` (``"sub/img-001"``); only the last suffix is removed
    (``"a.ome.tif"`` -> ``"a.ome"``; ``.nii.gz`` counts as one suffix). With ``root=None`` the id is the file stem. Paths are made
    absolute without following symlinks. Raises :class:`ConfigError` when ``path`` is not
    inside ``root``.
    """
    p = Path(path)
    if root is None:
        return p.name if is_dicom_series(p) else without_suffix(p.name)
    absolute = Path(os.path.abspath(p))
    base = Path(os.path.abspath(root))
    try:
        relative = absolute.relative_to(base)
    except ValueError as exc:
        raise ConfigError(f"image {p} is not inside the root folder {base}; pass the folder that holds it") from exc
    if not relative.parts:
        raise ConfigError(f"image path {p} is the root folder itself; pass the path of a file inside it")
    if is_dicom_series(p):  # a folder: its whole name
        return relative.as_posix()
    return without_suffix(relative.as_posix())
