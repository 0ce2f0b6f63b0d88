"""Tests for segcore.collection.store without Prefect: pairing, probing, grouping, chunking, writing and
reading back a store built from small PNGs under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr

from segcore import fsio
from segcore.config import IngestSpec
from segcore.errors import NotFound, StoreError
from segcore.collection.imageio import write_png
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import (
    MANIFEST_SCHEMA,
    GroupInfo,
    chunk_rows,
    create_store,
    manifest_hashes_masks,
    open_store,
    plan_groups,
    read_manifest,
    spec_json,
    write_manifest,
    write_store_chunk,
)

RNG = np.random.default_rng(0)
IMAGES = {
    "a": RNG.integers(0, 256, (4, 6), dtype=np.uint8),
    "b": RNG.integers(0, 256, (4, 6), dtype=np.uint8),
    "c": RNG.integers(0, 256, (4, 6), dtype=np.uint8),
    "d": RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8),
    "e": RNG.integers(0, 65536, (4, 6), dtype=np.uint16),
    "f": RNG.integers(0, 256, (8, 8), dtype=np.uint8),  # truncated on disk: header fine, pixels not
}
MASKS = {
    "a": RNG.integers(0, 3, (4, 6), dtype=np.uint8),
    "b": RNG.integers(0, 3, (3, 3), dtype=np.uint8),  # wrong shape
    "d": RNG.integers(0, 3, (5, 5), dtype=np.uint8),
    "e": RNG.integers(0, 3, (4, 6), dtype=np.uint8),
    "f": RNG.integers(0, 3, (8, 8), dtype=np.uint8),
}
# Groups, keys sorted: g000 (4, 6, 1, uint16) [e]; g001 (4, 6, 1, uint8) [a, b, c]; g002 (5, 5, 3, uint8) [d];
# g003 (8, 8, 1, uint8) [f]. chunk_pixels=48: 48 // 24 = 2, 48 // 25 = 1, 48 // 64 -> 1.
CHUNK_PIXELS, MAX_CHUNK = 48, 3


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name, arr in IMAGES.items():
        write_png(images / f"{name}.png", arr)
    truncated = images / "f.png"
    truncated.write_bytes(truncated.read_bytes()[:50])  # signature + IHDR + a few IDAT bytes
    (images / "bad.png").write_bytes(b"this is not a png at all")
    for name, arr in MASKS.items():
        write_png(masks / f"{name}.png", arr)
    return images, masks


def _planned(images: Path, masks: Path | None) -> tuple[list[GroupInfo], list[dict]]:
    rows = probe_sources(pair_sources(str(images), None if masks is None else str(masks)))
    return plan_groups(rows, chunk_pixels=CHUNK_PIXELS, max_chunk_images=MAX_CHUNK)


def _ingest(tmp_path: Path, images: Path, masks: Path | None) -> tuple[str, list[GroupInfo], list[dict]]:
    groups, rows = _planned(images, masks)
    store = str(tmp_path / "collection.zarr")
    create_store(store, groups, with_gt=masks is not None, mask_kind="class", spec={"chunk_pixels": CHUNK_PIXELS})
    final = [r for chunk in chunk_rows(rows, groups) for r in write_store_chunk(store, chunk)]
    final += [r for r in rows if r["group"] is None]
    write_manifest(store, final)
    return store, groups, final


def test_pair_sources(sources: tuple[Path, Path]) -> None:
    images, masks = sources
    rows = pair_sources(str(images), str(masks))
    assert [r["image_id"] for r in rows] == ["a", "b", "bad", "c", "d", "e", "f"]
    assert set(rows[0]) == set(MANIFEST_SCHEMA.names)
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["a"]["mask_path"] == str(masks / "a.png") and by_id["a"]["mask_status"] == "pending"
    assert by_id["c"]["mask_path"] is None and by_id["c"]["mask_status"] == "missing"
    assert {r["status"] for r in rows} == {"pending"}
    no_masks = pair_sources(str(images / "*.png"))
    assert all(r["mask_status"] == "missing" for r in no_masks) and len(no_masks) == 7


def test_pair_sources_missing_inputs(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    images, _ = sources
    with pytest.raises(NotFound, match="mask directory"):
        pair_sources(str(images), str(tmp_path / "no-masks"))
    with pytest.raises(NotFound):
        pair_sources(str(tmp_path / "no-images"))


def test_duplicate_ids_are_error_rows(tmp_path: Path) -> None:
    write_png(tmp_path / "x.png", np.zeros((2, 2), np.uint8))
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((2, 2), np.uint8))
    write_png(tmp_path / "y.png", np.zeros((2, 2), np.uint8))
    rows = pair_sources(str(tmp_path))
    assert [(r["image_id"], r["status"]) for r in rows] == [("x", "pending"), ("x", "error"), ("y", "pending")]
    assert "duplicate image id 'x'" in rows[1]["error"] and rows[1]["source_path"].endswith("x.tif")
    probed = probe_sources(rows)
    assert [r["status"] for r in probed] == ["ok", "error", "ok"]


def test_probe_sources(sources: tuple[Path, Path]) -> None:
    images, masks = sources
    paired = pair_sources(str(images), str(masks))
    rows = {r["image_id"]: r for r in probe_sources(paired)}
    assert all(r["status"] == "pending" for r in paired)  # the input rows are not modified
    assert (rows["a"]["height"], rows["a"]["width"], rows["a"]["channels"], rows["a"]["dtype"]) == (4, 6, 1, "uint8")
    assert (rows["d"]["channels"], rows["e"]["dtype"]) == (3, "uint16")
    assert rows["a"]["status"] == "ok" and rows["a"]["mask_status"] == "ok"
    assert len(rows["a"]["sha256"]) == 64
    assert rows["c"]["mask_status"] == "missing" and rows["c"]["mask_error"] is None
    assert rows["b"]["status"] == "ok" and rows["b"]["mask_status"] == "error"
    assert "3x3" in rows["b"]["mask_error"] and "4x6" in rows["b"]["mask_error"]
    assert rows["bad"]["status"] == "error" and "bad.png" in rows["bad"]["error"]
    assert rows["bad"]["mask_status"] == "missing" and rows["bad"]["height"] is None
    assert rows["f"]["status"] == "ok"  # headers alone look fine


def test_unreadable_image_with_a_mask_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "im").mkdir()
    (tmp_path / "im" / "z.png").write_bytes(b"garbage")
    write_png(tmp_path / "mk" / "z.png", np.zeros((2, 2), np.uint8))
    [row] = probe_sources(pair_sources(str(tmp_path / "im"), str(tmp_path / "mk")))
    assert (row["status"], row["mask_status"]) == ("error", "skipped")


def test_masks_are_signed_and_hashed_and_one_that_cannot_be_read_keeps_no_signature(sources, tmp_path) -> None:
    from segcore.collection.landing import stage_rows

    images, masks = sources
    paired = {r["image_id"]: r for r in pair_sources(str(images), str(masks))}
    rows = {r["image_id"]: r for r in probe_sources(list(paired.values()))}
    assert rows["a"]["mask_signature"] and len(rows["a"]["mask_sha256"]) == 64
    assert rows["b"]["mask_status"] == "error" and rows["b"]["mask_sha256"]  # read, not usable: hashed all the same
    assert rows["c"]["mask_signature"] is None and rows["c"]["mask_sha256"] is None  # no mask
    (masks / "a.png").unlink()  # listed, then gone before it was read
    [row] = probe_sources([paired["a"]])
    assert row["mask_status"] == "error" and row["mask_sha256"] is None and row["mask_signature"] is None
    gone = dict(paired["a"], mask_path="memory://nowhere/a.png")
    [staged] = stage_rows([gone], tmp_path / "staging")  # a mask that cannot be fetched: looked at again next run
    assert (staged["mask_path"], staged["mask_status"], staged["mask_signature"]) == (None, "missing", None)


def test_plan_groups_by_shape_and_dtype(sources: tuple[Path, Path]) -> None:
    groups, rows = _planned(*sources)
    assert [(g.name, g.height, g.width, g.channels, g.dtype, g.count, g.chunk_images) for g in groups] == [
        ("g000", 4, 6, 1, "uint16", 1, 2),
        ("g001", 4, 6, 1, "uint8", 3, 2),
        ("g002", 5, 5, 3, "uint8", 1, 1),
        ("g003", 8, 8, 1, "uint8", 1, 1),
    ]
    assert [(r["image_id"], r["group"], r["index"]) for r in rows] == [
        ("e", "g000", 0), ("a", "g001", 0), ("b", "g001", 1), ("c", "g001", 2), ("d", "g002", 0),
        ("f", "g003", 0), ("bad", None, -1),
    ]
    chunks = chunk_rows(rows, groups)
    assert [[r["image_id"] for r in c] for c in chunks] == [["e"], ["a", "b"], ["c"], ["d"], ["f"]]


@pytest.mark.parametrize(
    ("chunk_pixels", "max_images", "expected"),
    [(1000, 64, 10), (1000, 4, 4), (250, 64, 2), (199, 64, 1), (50, 64, 1), (100, 1, 1)],
)
def test_chunk_size_rule(chunk_pixels: int, max_images: int, expected: int) -> None:
    rows = [{"image_id": f"i{k}", "status": "ok", "height": 10, "width": 10, "channels": 1, "dtype": "uint8"}
            for k in range(25)]
    [g], planned = plan_groups(rows, chunk_pixels=chunk_pixels, max_chunk_images=max_images)
    assert g.chunk_images == expected and g.count == 25
    assert g.n_chunks == -(-25 // expected)
    assert g.chunk_range(g.n_chunks - 1) == ((g.n_chunks - 1) * expected, 25)
    assert "group" not in rows[0]  # the input rows are not modified
    assert sum(len(c) for c in chunk_rows(planned, [g])) == 25


def test_written_store_equals_sources(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    store, groups, final = _ingest(tmp_path, *sources)
    info = open_store(store)
    assert info.groups == tuple(groups)
    assert (info.mask_kind, info.has_gt, info.spec) == ("class", True, {"chunk_pixels": CHUNK_PIXELS})
    root = zarr.open_group(store, mode="r")
    rows = {r["image_id"]: r for r in final}
    for name in "abcde":
        r = rows[name]
        assert r["status"] == "ok"
        img = root[f"images/{r['group']}"][r["index"]]
        np.testing.assert_array_equal(img, IMAGES[name].reshape(img.shape))
        assert img.dtype == IMAGES[name].dtype
        gt = root[f"gt/{r['group']}"][r["index"]]
        assert gt.dtype == np.uint32
        if name in ("a", "d", "e"):
            assert r["mask_status"] == "ok"
            np.testing.assert_array_equal(gt, MASKS[name])
        else:
            assert r["mask_status"] == ("error" if name == "b" else "missing")
            assert not gt.any()
    assert root["images/g001"].chunks == (2, 4, 6, 1) and root["gt/g001"].chunks == (2, 4, 6)
    # The truncated file fails at decode: an error row and a zero slot.
    f = rows["f"]
    assert f["status"] == "error" and "f.png" in f["error"]
    assert not root["images/g003"][0].any()
    assert rows["bad"]["status"] == "error" and rows["bad"]["group"] is None


def test_manifest_round_trip(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    store, _, final = _ingest(tmp_path, *sources)
    table = read_manifest(store)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.num_rows == 7
    assert table.to_pylist() == [{k: r[k] for k in MANIFEST_SCHEMA.names} for r in final]
    assert not [p for p in Path(store).iterdir() if p.name.startswith(".")]


def test_a_manifest_is_read_once_until_its_file_changes(tmp_path: Path, sources: tuple[Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every work unit looks up its rows in the manifest: a worker reads the file once, and again only
    when the file was replaced (by another process, which cannot tell this one, or by this one)."""
    store, _, final = _ingest(tmp_path, *sources)
    reads: list[str] = []
    real = fsio.read_bytes
    monkeypatch.setattr(fsio, "read_bytes", lambda location: reads.append(str(location)) or real(location))
    first = read_manifest(store)
    assert read_manifest(store).equals(first) and len(reads) == 1
    assert read_manifest(store + "/").equals(first) and len(reads) == 1  # the same file, however named
    changed = [{**r, "status": "error" if r["status"] == "ok" else "ok"} for r in final]
    replacement = tmp_path / "elsewhere.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in MANIFEST_SCHEMA.names} for r in changed],
                                        schema=MANIFEST_SCHEMA), replacement)
    os.replace(replacement, Path(store) / "manifest.parquet")
    again = read_manifest(store)
    assert len(reads) == 2 and again.column("status").to_pylist() == [r["status"] for r in changed]
    write_manifest(store, final)  # in this process
    assert read_manifest(store).equals(first) and len(reads) == 3
    (Path(store) / "manifest.parquet").unlink()
    with pytest.raises(StoreError, match="no manifest"):
        read_manifest(store)


def test_read_manifest_missing(tmp_path: Path) -> None:
    create_store(str(tmp_path / "s.zarr"), [], with_gt=False, mask_kind="class", spec={})
    with pytest.raises(StoreError, match="no manifest"):
        read_manifest(str(tmp_path / "s.zarr"))
    with pytest.raises(StoreError, match="no manifest"):
        manifest_hashes_masks(str(tmp_path / "s.zarr"))


def test_whether_a_manifest_hashes_masks_is_read_from_its_schema(tmp_path: Path, sources: tuple[Path, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store, _, final = _ingest(tmp_path, *sources)
    monkeypatch.setattr(fsio, "read_bytes", lambda location: pytest.fail("the whole manifest was read"))
    assert manifest_hashes_masks(store)
    older = [name for name in MANIFEST_SCHEMA.names if not name.startswith("mask_sha256")]
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in older} for r in final],
                                        schema=pa.schema([MANIFEST_SCHEMA.field(k) for k in older])),
                   Path(store) / "manifest.parquet")
    assert not manifest_hashes_masks(store)  # written before masks were hashed


def test_store_without_masks(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    store, _, final = _ingest(tmp_path, sources[0], None)
    info = open_store(store)
    assert not info.has_gt
    assert "gt" not in zarr.open_group(store, mode="r")
    assert {r["mask_status"] for r in final} == {"missing"}


def test_chunk_must_be_exactly_one_chunk(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    groups, rows = _planned(*sources)
    store = str(tmp_path / "s.zarr")
    create_store(store, groups, with_gt=True, mask_kind="class", spec={})
    g001 = [r for r in rows if r["group"] == "g001"]
    with pytest.raises(StoreError, match="not exactly one chunk"):
        write_store_chunk(store, g001[:1])  # half a chunk
    with pytest.raises(StoreError, match="not exactly one chunk"):
        write_store_chunk(store, g001[1:3])  # straddles two chunks
    assert write_store_chunk(store, []) == []


def test_create_store_refuses_existing(tmp_path: Path) -> None:
    path = str(tmp_path / "s.zarr")
    old = GroupInfo(name="g000", height=2, width=2, channels=1, dtype="uint8", count=3, chunk_images=2)
    new = GroupInfo(name="g000", height=3, width=3, channels=1, dtype="uint16", count=1, chunk_images=1)
    create_store(path, [old], with_gt=True, mask_kind="class", spec={"v": 1})
    with pytest.raises(StoreError, match="already exists"):
        create_store(path, [new], with_gt=False, mask_kind="instance", spec={"v": 2})
    assert open_store(path).groups == (old,)
    create_store(path, [new], with_gt=False, mask_kind="instance", spec={"v": 2}, overwrite=True)
    info = open_store(path)
    assert (info.groups, info.has_gt, info.mask_kind, info.spec) == ((new,), False, "instance", {"v": 2})
    root = zarr.open_group(path, mode="r")
    assert root["images/g000"].shape == (1, 3, 3, 1) and "gt" not in root


def test_overwrite_keeps_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    precious = tmp_path / "images"
    write_png(precious / "a.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(StoreError):
        create_store(str(precious), [], with_gt=False, mask_kind="class", spec={}, overwrite=True)
    assert (precious / "a.png").is_file()


def test_open_store_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist") as info:
        open_store(str(tmp_path / "absent.zarr"))
    assert isinstance(info.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a segflow store"):
        open_store(str(tmp_path / "empty"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").attrs["other"] = 1
    with pytest.raises(StoreError, match="not a segflow store"):
        open_store(str(tmp_path / "plain.zarr"))
    (tmp_path / "file.zarr").write_text("not a directory")
    with pytest.raises(StoreError):
        open_store(str(tmp_path / "file.zarr"))


def test_open_store_refuses_future_format(tmp_path: Path) -> None:
    path = str(tmp_path / "s.zarr")
    create_store(path, [], with_gt=False, mask_kind="class", spec={})
    root = zarr.open_group(path, mode="r+")
    root.attrs["segflow"] = dict(root.attrs["segflow"], format=99)
    with pytest.raises(StoreError, match="format 99"):
        open_store(path)


def test_unknown_group_is_not_found(tmp_path: Path) -> None:
    path = str(tmp_path / "s.zarr")
    create_store(path, [], with_gt=False, mask_kind="class", spec={})
    with pytest.raises(NotFound, match="g042"):
        open_store(path).group("g042")


def test_spec_json() -> None:
    spec = IngestSpec(images="in/*.png", store="out.zarr")
    as_json = spec_json(spec)
    assert as_json["images"] == "in/*.png" and as_json["chunk_pixels"] == 4_194_304
    assert spec_json({"a": (1, 2)}) == {"a": [1, 2]}


def test_what_is_not_a_store_is_refused_with_one_message(tmp_path):
    from segcore.collection.store import open_store

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")  # a Zarr group of someone else's
    masks = zarr.open_group(str(tmp_path / "masks.zarr"), mode="w")  # segflow attributes of another kind
    masks.attrs["segflow"] = {"run_id": "r1", "format": 2}
    for name in ("plain.zarr", "masks.zarr"):
        with pytest.raises(StoreError, match="is not a segflow store"):
            open_store(str(tmp_path / name))
