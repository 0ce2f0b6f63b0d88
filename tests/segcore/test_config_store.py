"""Collection stores, model records, run directories and lakes may be paths or fsspec URLs."""

import pytest
from pydantic import ValidationError

from segcore.config import IngestSpec, SegmentSpec, TrainSpec


@pytest.mark.parametrize("store", ["s3://bucket/store.zarr", "file:///data/store.zarr", "memory://x", "store.zarr"])
def test_a_store_may_be_a_path_or_a_url(store):
    assert IngestSpec(images="imgs", store=store).store == store
    spec = SegmentSpec(store=store, checkpoint="s3://bucket/models/m.safetensors", out="s3://bucket/run")
    assert spec.store == store and spec.checkpoint == "s3://bucket/models/m.safetensors"
    assert TrainSpec(store=store, out="m.safetensors").store == store


def test_an_empty_store_location_is_refused():
    for make in (lambda: IngestSpec(images="imgs", store=" "),
                 lambda: SegmentSpec(store="", checkpoint="m.safetensors", out="run"),
                 lambda: TrainSpec(store="", out="m.safetensors")):
        with pytest.raises(ValidationError, match="location is empty"):
            make()


def test_run_directory_and_lake_may_be_urls():
    spec = SegmentSpec(store="store.zarr", checkpoint="m.safetensors", out="s3://bucket/run", lake="s3://bucket/lake")
    assert spec.out.startswith("s3://") and spec.lake.startswith("s3://")


def test_flow_run_placeholder_is_filled_in_store_and_run_directory_and_refused_for_incremental_runs():
    import datetime as dt

    from segcore.config import FLOW_RUN, RunSpec, flow_run_token, with_flow_run

    started = dt.datetime(2026, 11, 24, 19, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    token = flow_run_token(started, "0b6e5d1c-aaaa-bbbb-cccc-ddddeeeeffff")
    assert token == "20261124T180005Z-0b6e5d1c"
    store = f"runs/{FLOW_RUN}/store.zarr"
    spec = RunSpec(ingest=IngestSpec(images="in", store=store),
                   segment=SegmentSpec(store=store, checkpoint="c.safetensors", out=f"s3://b/runs/{FLOW_RUN}/run",
                                       lake="s3://b/lake"))
    filled = with_flow_run(spec, token)
    assert filled.ingest.store == filled.segment.store == f"runs/{token}/store.zarr"
    assert filled.segment.out == f"s3://b/runs/{token}/run" and filled.segment.lake == "s3://b/lake"
    assert filled.ingest.images == "in" and with_flow_run(filled, "other") == filled
    with pytest.raises(ValueError, match="incremental run keeps its run directory"):
        RunSpec(ingest=IngestSpec(images="in", store="s.zarr", incremental=True),
                segment=SegmentSpec(store="s.zarr", checkpoint="c.safetensors", out=f"runs/{FLOW_RUN}"))
    with pytest.raises(ValueError, match="incremental ingest appends to the same store"):
        IngestSpec(images="in", store=f"runs/{FLOW_RUN}/s.zarr", incremental=True)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_a_segment_run_takes_any_device_a_worker_can_resolve(device):
    assert SegmentSpec(store="s.zarr", checkpoint="m.safetensors", out="r", device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU"])
def test_an_unknown_device_is_refused_with_the_choices(device):
    with pytest.raises(ValueError, match="auto, cpu, cuda, cuda:N"):
        SegmentSpec(store="s.zarr", checkpoint="m.safetensors", out="r", device=device)


def test_training_options_that_would_be_ignored_or_lose_a_model_are_refused(tmp_path):
    base = {"store": "s.zarr", "out": "m.safetensors"}
    for extra, says in (({"val_split": "random", "group_pattern": r"^(\w+)_z"}, "with random it would be ignored"),
                        ({"val_split": "tail", "group_pattern": r"^(\w+)_z"}, "with tail it would be ignored"),
                        ({"model": "maskrcnn", "group_pattern": r"^(\w+)_z"}, "applies to semantic models"),
                        ({"init": "m.safetensors"}, "out is the init model being fine-tuned"),
                        ({"init": str(tmp_path / ".." / tmp_path.name / "p.safetensors"),
                          "out": str(tmp_path / "p.safetensors")}, "out is the init model")):
        with pytest.raises(ValidationError, match=says):
            TrainSpec(**{**base, **extra})
    assert TrainSpec(**base, val_split="group", group_pattern=r"^(\w+)_z").group_pattern == r"^(\w+)_z"
    assert TrainSpec(**base, group_pattern=r"^(\w+)_z").val_split == "auto"  # auto: group with a pattern
    assert TrainSpec(**base, init="parent.safetensors").init == "parent.safetensors"
