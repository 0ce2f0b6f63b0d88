"""The collection store is a local path; run directories and lakes may be URLs."""

import pytest
from pydantic import ValidationError

from segcore.config import IngestSpec, SegmentSpec, TrainSpec


@pytest.mark.parametrize("store", ["s3://bucket/store.zarr", "file:///data/store.zarr", "memory://x"])
def test_a_store_url_is_refused_with_what_to_do(store):
    for make in (lambda: IngestSpec(images="imgs", store=store),
                 lambda: SegmentSpec(store=store, checkpoint="m.safetensors", out="s3://bucket/run"),
                 lambda: TrainSpec(store=store, out="m.safetensors")):
        with pytest.raises(ValidationError, match="--store PATH"):
            make()


def test_run_directory_and_lake_may_be_urls():
    spec = SegmentSpec(store="store.zarr", checkpoint="m.safetensors", out="s3://bucket/run", lake="s3://bucket/lake")
    assert spec.out.startswith("s3://") and spec.lake.startswith("s3://")
