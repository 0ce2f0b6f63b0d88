"""Tests for segcore.collection.listing: image files, entries that only look like images, skipped files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segcore.collection.listing import entry_problem, image_id_for, list_images, list_sources
from segcore.errors import ConfigError, NotFound


def _make_tree(root: Path) -> None:
    for name in ("b.TIF", "a.png", "c.jpg", "img10.png", "img2.png", ".hidden.png", "notes.txt"):
        (root / name).write_bytes(b"x")
    (root / "dir.png").mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "d.png").write_bytes(b"x")


def test_list_images_in_directory(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.png", "b.TIF", "c.jpg", "img10.png", "img2.png"]


def test_list_images_with_glob(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    assert [p.name for p in list_images(str(tmp_path / "img*.png"))] == ["img10.png", "img2.png"]
    recursive = list_images(str(tmp_path / "**" / "*.png"))
    assert [p.relative_to(tmp_path).as_posix() for p in recursive] == ["a.png", "img10.png", "img2.png", "sub/d.png"]
    assert list_images(tmp_path / "a.png") == [tmp_path / "a.png"]


def test_list_images_without_match_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes(b"x")
    with pytest.raises(NotFound, match="no image files in directory"):
        list_images(tmp_path)
    with pytest.raises(NotFound, match="no image files in pattern"):
        list_images(str(tmp_path / "*.png"))
    with pytest.raises(NotFound, match="does not exist"):
        list_images(tmp_path / "missing")


def test_image_id_for(tmp_path: Path) -> None:
    assert image_id_for(tmp_path / "sub" / "img-001.png", root=tmp_path) == "sub/img-001"
    assert image_id_for(tmp_path / "a.ome.tif", root=tmp_path) == "a.ome"
    assert image_id_for(tmp_path / "sub" / "img-001.png") == "img-001"
    assert image_id_for("rel/dir/x.png", root="rel") == "dir/x"
    with pytest.raises(ConfigError, match="not inside"):
        image_id_for(tmp_path / "a.png", root=tmp_path / "other")
    with pytest.raises(ConfigError, match="root folder itself"):
        image_id_for(tmp_path, root=tmp_path)


def test_list_sources_reports_entries_named_like_images_and_counts_other_suffixes(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    os.symlink(tmp_path / "a.png", tmp_path / "link.png")
    os.mkfifo(tmp_path / "pipe.png")
    listing = list_sources(tmp_path)
    assert [p.name for p in listing.files] == ["a.png", "b.TIF", "c.jpg", "img10.png", "img2.png", "link.png"]
    reasons = {p.name: reason for p, reason in listing.problems}
    assert sorted(reasons) == ["dangling.png", "dir.png", "pipe.png"]
    assert reasons["dir.png"].startswith("a directory, not an image file")
    assert "gone.png, which does not exist" in reasons["dangling.png"]
    assert "FIFO" in reasons["pipe.png"]
    assert [p.name for p in listing.skipped] == ["notes.txt"]  # not .hidden.png, not the folder sub
    assert list_sources(str(tmp_path / "*.png")).skipped == ()


def test_entry_problem_of_a_regular_file_is_none(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    assert entry_problem(tmp_path / "a.png") is None


def test_a_folder_with_only_problem_entries_lists_them_and_list_images_says_why(tmp_path: Path) -> None:
    (tmp_path / "x.png").mkdir()
    assert [p.name for p, _ in list_sources(tmp_path).problems] == ["x.png"]
    with pytest.raises(NotFound, match="x.png: a directory"):
        list_images(tmp_path)
