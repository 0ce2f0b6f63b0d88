"""The run directory: creation and reopening (local and memory://), OME-Zarr 0.5 label images and the
layout of an earlier segflow."""

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
from segcore.pyramid import write_label_pyramid
from segcore.run.rundir import (done_records, instances_path, label_array, label_arrays, mark_done, masks_path,
                                prepare_run, pyramid_jobs, read_plan, read_run_info, table_dir,
                                unlist_pyramids)
from segcore.collection.store import GroupInfo
from tests.ngff_validation import validate_labels_group

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
    label_array(masks_path(run_dir), "g000", mode="r+")[0:2] = 1  # work done before the store grew
    again = _prepare(run_dir, store, [G0, G1], meta=INSTANCE)
    assert again["run_id"] == info["run_id"]
    for location, dtype in ((masks_path(run_dir), np.uint8), (instances_path(run_dir), np.uint32)):
        root = zarr.open_group(location, mode="r")
        arrays = label_arrays(location)
        assert sorted(arrays) == ["g000", "g001"] and list(root.array_keys()) == []
        assert arrays["g001"].shape == (1, 300, 200) and arrays["g001"].chunks == (1, 128, 128)
        assert arrays["g001"].dtype == dtype and root.attrs["segflow"]["run_id"] == info["run_id"]
        assert arrays["g001"].metadata.dimension_names == ("image", "y", "x")
        assert root.attrs["ome"] == {"version": "0.5", "labels": ["g000", "g001"]}
        assert arrays["g001"].path.endswith("g001/0")
    assert int(label_array(masks_path(run_dir), "g000")[0:2].sum()) == 2 * 32 * 40


def test_a_run_directory_of_an_earlier_segflow_keeps_its_arrays_and_gains_label_images(tmp_path: Path) -> None:
    store, run_dir = str(tmp_path / "store.zarr"), str(tmp_path / "run")
    _prepare(run_dir, store, [G0])
    root = zarr.open_group(masks_path(run_dir), mode="r+")  # as an earlier segflow laid it out: masks.zarr/g000
    del root["g000"]
    old = root.create_array("g000", shape=(5, 32, 40), chunks=(2, 32, 40), dtype="uint8",
                            dimension_names=("image", "y", "x"))
    old[1] = 2
    old_ome = {"version": "0.5", "multiscales": [{"name": "g000"}]}
    root.attrs["ome"] = old_ome
    big = GroupInfo(name="g002", height=600, width=90, channels=1, dtype="uint8", count=1, chunk_images=1)
    _prepare(run_dir, store, [G0, big])
    assert int(label_array(masks_path(run_dir), "g000")[1].sum()) == 2 * 32 * 40
    assert sorted(label_arrays(masks_path(run_dir))) == ["g000", "g002"]
    assert label_array(masks_path(run_dir), "g002").shape == (1, 600, 90)
    assert zarr.open_group(masks_path(run_dir), mode="r").attrs["ome"] == old_ome  # left as it was
    assert pyramid_jobs(run_dir) == [(fsio.join(masks_path(run_dir), "g002"), False)]  # not the old array


def test_pyramid_jobs_are_the_label_images_that_lack_levels_or_changed(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    big = GroupInfo(name="g002", height=600, width=90, channels=1, dtype="uint8", count=2, chunk_images=1)
    _prepare(run_dir, str(tmp_path / "store.zarr"), [G0, G1, big], meta=INSTANCE)
    masks, instances = masks_path(run_dir), instances_path(run_dir)
    # G0 (32 x 40) needs no pyramid; G1 (300 x 200) and g002 (600 x 90) do
    want = [(fsio.join(location, g), False) for location in (masks, instances) for g in ("g001", "g002")]
    assert pyramid_jobs(run_dir) == want
    for location, _ in want:
        write_label_pyramid(location)
    assert pyramid_jobs(run_dir) == []
    assert pyramid_jobs(run_dir, changed={"g000", "g002"}) == [(fsio.join(masks, "g002"), True),
                                                                (fsio.join(instances, "g002"), True)]
    assert label_array(masks, "g002").shape == (2, 600, 90)
    image = zarr.open_group(fsio.join(masks, "g002"), mode="r")
    assert [image[str(k)].shape for k in range(3)] == [(2, 600, 90), (2, 300, 45), (2, 150, 23)]
    # a run that wrote g002 again and ended with failures leaves its pyramids to the next run
    unlist_pyramids(run_dir, {"g002", "g009"})
    listed = zarr.open_group(fsio.join(masks, "g002"), mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in listed] == ["0"]
    assert pyramid_jobs(run_dir) == [(fsio.join(masks, "g002"), False), (fsio.join(instances, "g002"), False)]


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


def test_ngff_label_metadata_follows_the_spec(tmp_path: Path) -> None:
    store = tmp_path / "collection.zarr"
    run_dir = tmp_path / "runs" / "r1"
    _prepare(str(run_dir), str(store), [G0, G1], meta=INSTANCE)
    for location, class_names in ((masks_path(run_dir), INSTANCE.class_names), (instances_path(run_dir), None)):
        root = zarr.open_group(location, mode="r")
        assert root.attrs["segflow"]["class_names"] == list(INSTANCE.class_names)
        images = validate_labels_group(location)  # OME-NGFF 0.5, by ome-zarr-models
        assert sorted(images) == ["g000", "g001"]
        for name, image in images.items():
            (entry,) = image.attributes.ome.multiscales
            assert entry.name == name and [d.path for d in entry.datasets] == ["0"]  # no pyramid before the masks
            assert [(a.name, a.type) for a in entry.axes] == [("image", "index"), ("y", "space"), ("x", "space")]
            label = root[name].attrs["ome"]["image-label"]
            colors = label["colors"]
            assert colors[0] == {"label-value": 0, "rgba": [0, 0, 0, 0]}
            if class_names:
                assert [c["label-value"] for c in colors] == list(range(len(class_names)))
                assert [p["class"] for p in label["properties"]] == list(class_names)
            # source: relative path from the label image to the store's array of the same images
            assert (Path(location) / name / label["source"]["image"]).resolve() == (store / "images" / name).resolve()


def test_many_classes_cycle_the_palette_and_urls_have_no_source() -> None:
    attrs = label_image_attrs("g000", class_names=[f"c{k}" for k in range(25)])
    colors = attrs["image-label"]["colors"]
    assert len(colors) == 25 and colors[1]["rgba"] == colors[11]["rgba"] != colors[2]["rgba"]
    assert "source" not in attrs["image-label"]


def test_viewers_show_each_class_in_the_colour_of_the_run_figures() -> None:
    labels = np.arange(4, dtype=np.uint8)[None]  # (1, 4): one pixel of each class 0..3
    overlay = overlay_rgb(np.zeros((1, 4), np.uint8), labels, alpha=1.0)
    colors = label_image_attrs("g000", class_names=["bg", "a", "b", "c"])["image-label"]["colors"]
    assert [c["rgba"] for c in colors[1:]] == [[*map(int, overlay[0, k]), 255] for k in (1, 2, 3)]
    assert len({tuple(c["rgba"]) for c in colors[1:]}) == 3
