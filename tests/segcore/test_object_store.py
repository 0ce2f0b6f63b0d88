"""A collection store and a model record at an fsspec URL (s3:// on the local moto server): every
reader gives what it gives for the local copy, units segmented from them equal local units, and a
missing or foreign object is named with what to do."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from segcore import fsio
from segcore.collection.fingerprint import read_fingerprint
from segcore.collection.imageio import write_png
from segcore.collection.resume import IngestRecord, clear, done_chunks, mark_done, read_plan, write_plan
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import (chunk_rows, create_store, has_manifest, manifest_hashes_masks, open_store,
                                      plan_groups, read_manifest, store_exists, store_root, write_manifest,
                                      write_store_chunk)
from segcore.errors import CheckpointError, ConfigError, NotFound, StoreError
from segcore.lease import store_lease
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, load_checkpoint, read_meta, save_checkpoint
from segcore.models.importing import import_model
from segcore.models.predict import open_predictor
from segcore.models.record import local_record, model_sha256, read_model_meta
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from segcore.run.start import preflight, start_run
from segcore.run.units import segment_unit, unit_rows

META = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "a", "b"), in_channels=1,
                 normalisation=Normalisation(mode="range", scale=255.0))


def _upload(local: Path, url: str) -> str:
    """Copy a local file or directory to ``url`` (every file, as an upload tool would)."""
    files = [(rel, str(full)) for rel, full in fsio.tree(local)] if local.is_dir() else [("", str(local))]
    for rel, full in files:
        fsio.write_bytes(fsio.join(url, rel) if rel else url, Path(full).read_bytes())
    return url


@pytest.fixture
def on_s3(s3_server, tmp_path: Path) -> dict:
    """A store of 9 images in two groups (7 of 16x16, 2 of 12x20; every third without a mask) and a UNet
    checkpoint, locally and uploaded to a fresh bucket."""
    rng = np.random.default_rng(5)
    for i in range(9):
        img = rng.integers(0, 256, (16, 16) if i < 7 else (12, 20), dtype=np.uint8)
        write_png(tmp_path / "img" / f"i{i}.png", img)
        if i % 3:
            write_png(tmp_path / "gt" / f"i{i}.png", (img // 90).astype(np.uint8))
    rows = probe_sources(pair_sources(str(tmp_path / "img"), str(tmp_path / "gt")))
    groups, planned = plan_groups(rows, chunk_pixels=3 * 256, max_chunk_images=64)
    store = str(tmp_path / "s.zarr")
    create_store(store, groups, with_gt=True, mask_kind="class", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c, threads=1)])
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", create_model("unet", in_channels=1, num_classes=3, base=4,
                                                                    depth=2), META)
    bucket = s3_server.bucket()
    return {"store": store, "ckpt": str(ckpt), "bucket": bucket, "tmp": tmp_path,
            "store_url": _upload(Path(store), f"{bucket}/data/s.zarr"),
            "ckpt_url": _upload(ckpt, f"{bucket}/models/m.safetensors")}


def test_a_store_at_a_url_reads_as_its_local_copy(on_s3) -> None:
    local, url = on_s3["store"], on_s3["store_url"]
    assert store_exists(url) and has_manifest(url) and not store_exists(f"{on_s3['bucket']}/data/none.zarr")
    assert open_store(url).groups == open_store(local).groups and len(open_store(url).groups) == 2
    assert open_store(url).store_id == open_store(local).store_id and open_store(url).path == url
    assert read_manifest(url).equals(read_manifest(local)) and manifest_hashes_masks(url)
    assert read_fingerprint(url) == read_fingerprint(local)
    assert unit_rows(url, "g001", 1, 3) == unit_rows(local, "g001", 1, 3)
    for g in open_store(local).groups:
        for kind in ("images", "gt"):
            name = f"{kind}/{g.name}"
            np.testing.assert_array_equal(store_root(url)[name][:], store_root(local)[name][:])


def test_units_segmented_from_a_store_and_checkpoint_at_urls_equal_local_units(on_s3) -> None:
    runs = {}
    for name, store, ckpt in (("local", on_s3["store"], on_s3["ckpt"]), ("url", on_s3["store_url"], on_s3["ckpt_url"])):
        out = str(on_s3["tmp"] / f"run-{name}")
        ctx, plan, _, _ = start_run(store, ckpt, out, batch_size=2, device="cpu")
        assert ctx.store == store and ctx.checkpoint == ckpt and len(plan.units) == 4
        for unit in plan.units:
            segment_unit(ctx, unit)
        runs[name] = open_run(out)
    a, b = runs["local"], runs["url"]
    assert b.info["store"] == on_s3["store_url"] and b.info["checkpoint"] == on_s3["ckpt_url"]
    assert a.info["checkpoint_sha256"] == b.info["checkpoint_sha256"] == fsio.file_sha256(on_s3["ckpt"])
    assert a.image_ids == b.image_ids and len(a.image_ids) == 9
    for image_id in a.image_ids:
        np.testing.assert_array_equal(a.mask(image_id), b.mask(image_id))
        np.testing.assert_array_equal(a.image(image_id), b.image(image_id))
    cols = [c for c in a.dice_table().column_names if c != "run_id"]
    order = [("image_id", "ascending"), ("class_id", "ascending")]
    ta, tb = a.dice_table().select(cols).sort_by(order), b.dice_table().select(cols).sort_by(order)
    assert ta.num_rows == 6 * 3 and ta.equals(tb)  # the 6 images with ground truth x 3 classes


def test_a_store_inside_a_run_directory_on_the_same_bucket_is_not_foreign(on_s3) -> None:
    """``segflow run --out s3://b/r`` without --store ingests into ``s3://b/r/store.zarr``; the run directory
    then holds the store, and is still a new, empty run directory."""
    out = f"{on_s3['bucket']}/r"
    store = _upload(Path(on_s3["store"]), f"{out}/store.zarr")
    ctx, plan, _, _ = start_run(store, on_s3["ckpt_url"], out, device="cpu")
    assert fsio.exists(fsio.join(out, "run.json")) and ctx.store == store and plan.units
    fsio.write_bytes(f"{on_s3['bucket']}/other/x.txt", b"x")
    with pytest.raises(StoreError, match="not a segflow run directory"):
        start_run(store, on_s3["ckpt_url"], f"{on_s3['bucket']}/other", device="cpu")


def test_a_checkpoint_at_a_url_reads_hashes_and_loads_as_its_local_copy(on_s3) -> None:
    local, url = on_s3["ckpt"], on_s3["ckpt_url"]
    assert read_meta(url) == read_model_meta(url) == read_meta(local) == META
    assert model_sha256(url) == model_sha256(local) == fsio.file_sha256(url) == fsio.file_sha256(local)
    (ma, _), (mb, _) = load_checkpoint(local), load_checkpoint(url)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    np.testing.assert_array_equal(open_predictor(url).labels(images), open_predictor(local).labels(images))


def test_preflight_fetches_a_model_at_a_url_once(on_s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model and hashing it both need its bytes: the object is read once for both."""
    import segcore.models.record as record
    url, fetched = on_s3["ckpt_url"], []
    real_read, real_hash = fsio.read_bytes, record.file_sha256
    monkeypatch.setattr(fsio, "read_bytes", lambda where: fetched.append(str(where)) or real_read(where))
    monkeypatch.setattr(record, "file_sha256", lambda where: fetched.append(str(where)) or real_hash(where))
    meta, sha, _ = preflight(on_s3["store_url"], url)
    assert fetched.count(url) == 1
    assert meta == META and sha == fsio.file_sha256(on_s3["ckpt"])
    broken = f"{on_s3['bucket']}/models/broken.safetensors"  # a record whose weights do not fit its metadata
    save_checkpoint(on_s3["tmp"] / "b.safetensors", create_model("unet", in_channels=1, num_classes=3, base=8,
                                                                  depth=2), META)
    _upload(on_s3["tmp"] / "b.safetensors", broken)
    with pytest.raises(CheckpointError, match=f"weights in '{broken}' do not fit"):
        preflight(on_s3["store_url"], broken)
    with pytest.raises(NotFound, match="does not exist"):
        preflight(on_s3["store_url"], f"{on_s3['bucket']}/models/none.safetensors")


def test_a_directory_record_at_a_url_reads_hashes_and_predicts_as_its_local_copy(on_s3) -> None:
    tmp = on_s3["tmp"]
    torch.jit.trace(torch.nn.Conv2d(1, 2, 3, padding=1).eval(), torch.zeros(1, 1, 8, 8)).save(str(tmp / "n.pt"))
    import_model(tmp / "n.pt", out=tmp / "n.segflow", in_channels=1, class_names="bg,fg")
    url = _upload(tmp / "n.segflow", f"{on_s3['bucket']}/models/n.segflow")
    assert read_model_meta(url) == read_model_meta(tmp / "n.segflow")
    assert model_sha256(url) == model_sha256(tmp / "n.segflow")
    with local_record(url) as copy:
        assert model_sha256(copy) == model_sha256(url) and read_model_meta(copy) == read_model_meta(url)
    assert not Path(copy).exists()  # the copy is removed
    images = np.random.default_rng(1).integers(0, 256, (2, 9, 7, 1), dtype=np.uint8)
    np.testing.assert_array_equal(open_predictor(url, precision="fp32").labels(images),
                                  open_predictor(tmp / "n.segflow", precision="fp32").labels(images))


def test_missing_and_foreign_objects_are_named_with_what_to_do(on_s3) -> None:
    bucket = on_s3["bucket"]
    with pytest.raises(NotFound, match="does not exist.*credentials"):
        open_store(f"{bucket}/data/none.zarr")
    for read in (read_meta, read_model_meta, load_checkpoint):
        with pytest.raises(NotFound, match="does not exist"):
            read(f"{bucket}/models/none.safetensors")
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    for name, data, match in (("short", b"abc", "holds 3 bytes"), ("huge", struct.pack("<Q", 1 << 40), "claims"),
                              ("text", struct.pack("<Q", 4) + b"not json", "not JSON"),
                              ("plain", struct.pack("<Q", len(header)) + header, "no segflow metadata")):
        fsio.write_bytes(f"{bucket}/models/{name}.safetensors", data)
        with pytest.raises(CheckpointError, match=match):
            read_meta(f"{bucket}/models/{name}.safetensors")
    fsio.write_bytes(f"{bucket}/models/empty.segflow/README", b"x")
    with pytest.raises(CheckpointError, match="without model.json"):
        read_model_meta(f"{bucket}/models/empty.segflow")


def test_an_ingest_record_and_lease_at_a_url(s3_server) -> None:
    bucket = s3_server.bucket()
    store = f"{bucket}/c.zarr"
    assert store_lease(store) == f"{bucket}/.segflow-lease.c.zarr.json"
    with pytest.raises(ConfigError, match="is a bucket"):
        store_lease(bucket)
    record = IngestRecord(kind="create", spec={"a": 1}, listed=(("x.png", "1:2", None, None),), planned=(),
                          groups=())
    mark_done(store, [{"group": "g000", "index": 0}])  # no plan: not recorded
    assert read_plan(store) is None and done_chunks(store) == {}
    write_plan(store, record)
    mark_done(store, [{"group": "g000", "index": 4, "status": "ok"}])
    assert read_plan(store) == record
    assert done_chunks(store) == {"g000-000004": [{"group": "g000", "index": 4, "status": "ok"}]}
    clear(store)
    assert read_plan(store) is None and done_chunks(store) == {} and not fsio.list_files(store)
