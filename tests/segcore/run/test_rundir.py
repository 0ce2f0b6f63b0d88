"""The run directory: creation and reopening (local and memory://), OME-Zarr 0.5 label metadata."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from segcore import fsio
from segcore.models.checkpoint import ModelMeta
from segcore.errors import NotFound, StoreError
from segcore.figures import overlay_rgb
from segcore.ngff import label_image_attrs
from segcore.normalise import Normalisation
from segcore.run.context import DetectRecord, ImageRecord
from segcore.run.plan import RunPlan
from segcore.run.rundir import (done_records, instances_path, mark_done, masks_path, prepare_run, read_plan,
                                read_run_info, table_dir)
from segcore.collection.store import GroupInfo

SEMANTIC = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "disc", "square"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0))
INSTANCE = ModelMeta(arch="maskrcnn_r18", arch_kwargs={}, class_names=("background", "nucleus"), in_channels=1,
                     normalisation=Normalisation())
G0 = GroupInfo(name="g000", height=32, width=40, channels=1, dtype="uint8", count=5, chunk_images=2)
G1 = GroupInfo(name="g001", height=300, width=200, channels=1, dtype="uint8", count=1, chunk_images=1, tile=128)


def _prepare(run_dir: str, store: str, groups, meta: ModelMeta = SEMANTIC, sha: str = "abc") -> dict:
    return prepare_run(run_dir, store_path=store, checkpoint="model.safetensors", checkpoint_sha256=sha, meta=meta,
                       groups=groups, plan=RunPlan(units=()), shaping={"precision": "bf16"}, spec={"out": run_dir})


@pytest.fixture(params=["local", "memory"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "run") if request.param == "local" else f"memory://segflow-{uuid.uuid4().hex}/run"


def test_locations_are_strings_in_the_form_of_the_run_dir() -> None:
    assert masks_path("s3://b/r") == "s3://b/r/masks.zarr" and instances_path("r/") == "r/instances.zarr"
    assert table_dir("s3://b/r", "dice", "20261124T1") == "s3://b/r/dice/run_id=20261124T1"
    assert table_dir(Path("/x/r"), "seams") == "/x/r/seams"


def test_create_then_reopen_adds_only_new_groups(run_dir: str, tmp_path: Path) -> None:
    store = str(tmp_path / "store.zarr")
    info = _prepare(run_dir, store, [G0], meta=INSTANCE)
    assert read_run_info(run_dir) == info and info["store"] == str(Path(store).resolve())
    zarr.open_group(masks_path(run_dir), mode="r+")["g000"][0:2] = 1  # work done before the store grew
    again = _prepare(run_dir, store, [G0, G1], meta=INSTANCE)
    assert again["run_id"] == info["run_id"]
    for location, dtype in ((masks_path(run_dir), np.uint8), (instances_path(run_dir), np.uint32)):
        root = zarr.open_group(location, mode="r")
        assert sorted(root.array_keys()) == ["g000", "g001"]
        assert root["g001"].shape == (1, 300, 200) and root["g001"].chunks == (1, 128, 128)
        assert root["g001"].dtype == dtype and root.attrs["segflow"]["run_id"] == info["run_id"]
        assert [m["name"] for m in root.attrs["ome"]["multiscales"]] == ["g000", "g001"]
    assert int(zarr.open_group(masks_path(run_dir), mode="r")["g000"][0:2].sum()) == 2 * 32 * 40


def test_reopen_refuses_another_checkpoint_and_a_foreign_directory(run_dir: str, tmp_path: Path) -> None:
    store = str(tmp_path / "store.zarr")
    _prepare(run_dir, store, [G0])
    with pytest.raises(StoreError, match="holds run"):
        _prepare(run_dir, store, [G0], sha="other")
    foreign = fsio.join(run_dir + "-foreign")
    fsio.write_bytes(fsio.join(foreign, "notes.txt"), b"mine")
    with pytest.raises(StoreError, match="not a segflow run directory"):
        _prepare(foreign, store, [G0])
    with pytest.raises(NotFound):
        read_run_info(foreign)


def test_reopen_refuses_a_store_created_anew_since(tmp_path: Path) -> None:
    store, run_dir = str(tmp_path / "store.zarr"), str(tmp_path / "run")
    prepare_run(run_dir, store_path=store, store_id="first", checkpoint="m.safetensors", checkpoint_sha256="abc",
                meta=SEMANTIC, groups=[G0], plan=RunPlan(units=()), shaping={}, spec={})
    assert read_run_info(run_dir)["store_id"] == "first"
    prepare_run(run_dir, store_path=store, store_id="first", checkpoint="m.safetensors", checkpoint_sha256="abc",
                meta=SEMANTIC, groups=[G0], plan=RunPlan(units=()), shaping={}, spec={})
    with pytest.raises(StoreError, match="created anew"):
        prepare_run(run_dir, store_path=store, store_id="second", checkpoint="m.safetensors", checkpoint_sha256="abc",
                    meta=SEMANTIC, groups=[G0], plan=RunPlan(units=()), shaping={}, spec={})


def test_a_store_inside_the_run_directory_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "run" / "store.zarr").mkdir(parents=True)
    _prepare(str(tmp_path / "run"), str(tmp_path / "run" / "store.zarr"), [G0])
    assert (tmp_path / "run" / "run.json").exists()


def test_done_records_of_the_run_key_are_read_back(run_dir: str) -> None:
    assert done_records(run_dir, "k1") == {}
    detect = DetectRecord(unit="unit-00003", key="k1", objects=4, windows=1, capped=0, seconds=0.5)
    image = ImageRecord(part="g001-000000", group="g001", index=0, key="k1", image_id="x", blocks=4, dice_rows=2)
    for record in (detect, image, DetectRecord(unit="unit-00001", key="k0", objects=1, windows=1, capped=0,
                                               seconds=0.1)):
        mark_done(run_dir, record)
    fsio.write_bytes(fsio.join(run_dir, "units", ".unit-00002.json.x.tmp"), b"{")  # a half-written marker
    assert done_records(run_dir, "k1") == {"unit-00003.detect": detect, "image-g001-000000": image}
    assert list(done_records(run_dir, "k0")) == ["unit-00001.detect"]


def test_the_plan_is_recorded_and_another_one_refused(tmp_path: Path) -> None:
    from segcore.run.plan import WorkUnit

    run_dir, store = str(tmp_path / "run"), str(tmp_path / "store.zarr")
    units = tuple(WorkUnit(unit_id=i, group="g000", start=2 * i, stop=min(2 * i + 2, 5)) for i in range(3))
    kwargs = dict(store_path=store, checkpoint="m.safetensors", checkpoint_sha256="abc", meta=SEMANTIC,
                  groups=[G0], shaping={}, spec={})
    prepare_run(run_dir, plan=RunPlan(units=units[:2]), **kwargs)
    prepare_run(run_dir, plan=RunPlan(units=units), **kwargs)  # the store grew: the plan is extended
    assert read_plan(run_dir) == RunPlan(units=units)
    with pytest.raises(StoreError, match="no longer match"):
        prepare_run(run_dir, plan=RunPlan(units=units[1:]), **kwargs)


def _check_multiscale(ms: dict, array: zarr.Array) -> None:
    """The required fields of an NGFF 0.5 multiscale for one single-level ``(N, H, W)`` array."""
    axes = ms["axes"]
    assert len(axes) == array.ndim == 3 and len({a["name"] for a in axes}) == 3
    assert [a["name"] for a in axes] == list(array.metadata.dimension_names)
    types = [a.get("type") for a in axes]
    assert types.count("space") in (2, 3) and types[-2:] == ["space", "space"]
    assert types[0] not in ("space", "channel", "time")  # one custom-typed axis, before the space axes
    assert [d["path"] for d in ms["datasets"]] == [ms["name"]]
    (transforms,) = [d["coordinateTransformations"] for d in ms["datasets"]]
    assert [t["type"] for t in transforms] == ["scale"] and len(transforms[0]["scale"]) == 3


def test_ngff_label_metadata_follows_the_spec(tmp_path: Path) -> None:
    store = tmp_path / "collection.zarr"
    run_dir = tmp_path / "runs" / "r1"
    _prepare(str(run_dir), str(store), [G0, G1], meta=INSTANCE)
    for location, class_names in ((masks_path(run_dir), INSTANCE.class_names), (instances_path(run_dir), None)):
        root = zarr.open_group(location, mode="r")
        ome = root.attrs["ome"]
        assert ome["version"] == "0.5" and root.attrs["segflow"]["class_names"] == list(INSTANCE.class_names)
        assert [m["name"] for m in ome["multiscales"]] == ["g000", "g001"]
        for ms in ome["multiscales"]:
            _check_multiscale(ms, root[ms["name"]])
            assert np.issubdtype(root[ms["name"]].dtype, np.integer)
        label = ome["image-label"]
        colors = label["colors"]
        assert colors and len({c["label-value"] for c in colors}) == len(colors)
        assert all(isinstance(c["label-value"], int) and len(c["rgba"]) == 4 and
                   all(isinstance(v, int) and 0 <= v <= 255 for v in c["rgba"]) for c in colors)
        assert colors[0] == {"label-value": 0, "rgba": [0, 0, 0, 0]}
        if class_names:
            assert [c["label-value"] for c in colors] == list(range(len(class_names)))
            assert [p["class"] for p in label["properties"]] == list(class_names)
        # source: relative path from the label image to the images group with the same array names
        assert (Path(location) / label["source"]["image"]).resolve() == (store / "images").resolve()


def test_many_classes_cycle_the_palette_and_urls_have_no_source() -> None:
    attrs = label_image_attrs(["g000"], class_names=[f"c{k}" for k in range(25)])
    colors = attrs["image-label"]["colors"]
    assert len(colors) == 25 and colors[1]["rgba"] == colors[11]["rgba"] != colors[2]["rgba"]
    assert "source" not in attrs["image-label"]


def test_viewers_show_each_class_in_the_colour_of_the_run_figures() -> None:
    labels = np.arange(4, dtype=np.uint8)[None]  # (1, 4): one pixel of each class 0..3
    overlay = overlay_rgb(np.zeros((1, 4), np.uint8), labels, alpha=1.0)
    colors = label_image_attrs(["g000"], class_names=["bg", "a", "b", "c"])["image-label"]["colors"]
    assert [c["rgba"] for c in colors[1:]] == [[*map(int, overlay[0, k]), 255] for k in (1, 2, 3)]
    assert len({tuple(c["rgba"]) for c in colors[1:]}) == 3
