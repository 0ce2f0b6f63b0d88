"""The --dask-address path on a real cluster: `dask scheduler` + two `dask worker` processes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from flows.execution import started_cluster
from flows.pipeline import ingest_flow, segment_flow, with_runner
from segcore.config import ExecutionSpec, IngestSpec, SegmentSpec
from segcore.run.results import open_run
from tests.external_cluster import external_cluster



@pytest.fixture
def dask_cluster(tmp_path):
    with external_cluster(tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), name="ext", timeout=60) as address:
        yield address


def test_existing_cluster_gives_the_same_outputs_as_the_default_path(collection, tmp_path, dask_cluster):
    outputs = {}
    store = str(tmp_path / "store.zarr")
    local = ExecutionSpec(n_workers=2, threads_per_worker=1)
    with started_cluster(local):  # one local cluster for the ingest and the local run
        with_runner(ingest_flow, local)(IngestSpec(images=collection["images"], masks=collection["masks"],
                                                   store=store, max_chunk_images=8))
        for name, execution in (("local", local),
                                ("external", ExecutionSpec(dask_address=dask_cluster, threads_per_worker=1))):
            spec = SegmentSpec(store=store, checkpoint=collection["checkpoint"], out=str(tmp_path / name),
                               batch_size=4, execution=execution)
            summary = with_runner(segment_flow, execution)(spec)
            assert summary["units_failed"] == 0
            outputs[name] = open_run(spec.out)
    a, b = outputs["local"], outputs["external"]
    assert a.image_ids == b.image_ids and len(a.image_ids) > 0
    for image_id in a.image_ids:
        np.testing.assert_array_equal(a.mask(image_id), b.mask(image_id))
    cols = [c for c in a.dice_table().column_names if c != "run_id"]
    ta = a.dice_table().select(cols).sort_by([("image_id", "ascending"), ("class_id", "ascending")])
    tb = b.dice_table().select(cols).sort_by([("image_id", "ascending"), ("class_id", "ascending")])
    assert ta.equals(tb)
    # Every unit ran on the external workers (not in this process), spread over both of them.
    records = [json.loads(p.read_text()) for p in (tmp_path / "external" / "units").glob("*.json")]
    assert len(records) == len(list((tmp_path / "local" / "units").glob("*.json"))) >= 4
    pids = {r["timing"]["pid"] for r in records}
    assert os.getpid() not in pids and len(pids) == 2
