"""A Dask cluster without a shared file system: the collection store, the checkpoint and the run
directory on S3 (a local moto server); a `dask scheduler` and two `dask worker` processes, each
started in an empty directory of its own, with the S3 endpoint, its credentials and the Prefect API
in its environment and nothing of this process's paths; `segflow segment --dask-address ...` gives
the outputs of a local run of the same store and checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import segcore
from flows.cli import main
from flows.pipeline import ingest_flow, segment_flow, with_runner
from segcore import fsio
from segcore.collection.store import open_store, read_manifest, store_root
from segcore.config import ExecutionSpec, IngestSpec, SegmentSpec
from segcore.run.results import open_run
from tests.external_cluster import external_cluster

#: The packages segflow installs (pyproject.toml); the workers import them and nothing else of the repository.
PACKAGES = ("segcore", "tasks", "flows")


def _worker_env() -> dict[str, str]:
    """What a worker on another host would be given: PATH, the S3 endpoint and credentials (set by the
    ``s3_server`` fixture) and the Prefect API; no PYTHONPATH, no directory of this process."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL") or k.startswith("AWS_")}
    env.update(PREFECT_API_URL=os.environ["PREFECT_API_URL"], PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", OMP_NUM_THREADS="1")
    return env


def _code_path(env: dict[str, str], directory: Path) -> str | None:
    """None when a clean interpreter of this environment imports the segcore this test runs (the
    installed package: the usual case); else a directory holding links to the three installed packages
    of this checkout (an editable install made from another checkout), for the workers' PYTHONPATH."""
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('segcore').origin)"],
                           env=env, cwd=directory, capture_output=True, text=True, timeout=120)
    here = Path(segcore.__file__).resolve()
    if probe.returncode == 0 and Path(probe.stdout.strip()).resolve() == here:
        return None
    links = directory / "packages"
    links.mkdir()
    for name in PACKAGES:
        (links / name).symlink_to(here.parents[1] / name, target_is_directory=True)
    return str(links)


@dataclass
class Clusters:
    remote: str  # address of the scheduler of the two isolated workers
    homes: list[Path]  # their working directories
    warm: list  # futures of their first imports (started at once, while the local flows run)
    local: ExecutionSpec  # one local worker for the local flows (ingests and the local run)


@pytest.fixture(scope="module")
def clusters(prefect_harness, s3_server, tmp_path_factory):
    from distributed import Client, LocalCluster

    env = _worker_env()
    code = _code_path(env, tmp_path_factory.mktemp("probe"))
    if code is not None:
        env["PYTHONPATH"] = code
    homes = [tmp_path_factory.mktemp(f"worker-{i}") for i in (1, 2)]
    with external_cluster(tmp_path_factory.mktemp("cluster-logs"), env=env, name="s3", own_dirs=homes,
                          timeout=90) as address, Client(address, timeout=30) as client:
        warm = [client.submit(exec, "import tasks.segment", pure=False, workers=[w], allow_other_workers=False)
                for w in client.scheduler_info()["workers"]]
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
            yield Clusters(remote=address, homes=homes, warm=warm,
                           local=ExecutionSpec(dask_address=local.scheduler_address, threads_per_worker=1))


@pytest.fixture(scope="module")
def stores(collection, s3_server, clusters, tmp_path_factory) -> dict[str, str]:
    """The collection ingested twice: into a local store and straight into one on S3."""
    bucket = s3_server.bucket()
    local, remote = str(tmp_path_factory.mktemp("object-store") / "store.zarr"), f"{bucket}/collection.zarr"
    for store in (local, remote):
        with_runner(ingest_flow, clusters.local)(IngestSpec(images=collection["images"], masks=collection["masks"],
                                                            store=store, max_chunk_images=8))
    return {"bucket": bucket, "local": local, "remote": remote}


def test_a_store_ingested_straight_to_s3_equals_the_local_one(stores) -> None:
    local, remote = open_store(stores["local"]), open_store(stores["remote"])
    assert not fsio.exists(Path(stores["remote"].split("://", 1)[1]))  # nothing written to a local path of that name
    assert local.groups == remote.groups and len(local.groups) == 2 and local.store_id != remote.store_id
    assert read_manifest(stores["local"]).equals(read_manifest(stores["remote"]))
    a, b = store_root(stores["local"]), store_root(stores["remote"])
    for g in local.groups:
        for kind in ("images", "gt"):
            np.testing.assert_array_equal(a[f"{kind}/{g.name}"][:], b[f"{kind}/{g.name}"][:])
    assert not fsio.list_files(fsio.join(stores["remote"], "_ingest"))  # the resume record is gone
    assert not fsio.exists(f"{stores['bucket']}/.segflow-lease.collection.zarr.json")  # the lease is released


@pytest.mark.timeout(300)
def test_a_cluster_without_a_shared_file_system_gives_the_outputs_of_a_local_run(
        stores, fitted_checkpoint, clusters, tmp_path) -> None:
    checkpoint = f"{stores['bucket']}/models/unet.safetensors"
    fsio.write_bytes(checkpoint, Path(fitted_checkpoint).read_bytes())
    local_out, remote_out = str(tmp_path / "local"), f"{stores['bucket']}/runs/r1"
    with_runner(segment_flow, clusters.local)(SegmentSpec(store=stores["local"], checkpoint=fitted_checkpoint,
                                                          out=local_out, batch_size=4, execution=clusters.local))

    from distributed import Client, wait

    with Client(clusters.remote, timeout=30) as client:
        wait(clusters.warm, timeout=120)
        assert all(f.status == "finished" for f in clusters.warm), [f.exception() for f in clusters.warm]
        cwds, packages = client.run(os.getcwd), client.run(eval, "__import__('segcore').__file__")
    assert sorted(cwds.values()) == sorted(map(str, clusters.homes))  # each in its own directory
    assert {str(Path(f).resolve()) for f in packages.values()} == {str(Path(segcore.__file__).resolve())}
    assert main(["segment", "--store", stores["remote"], "--checkpoint", checkpoint, "--out", remote_out,
                 "--dask-address", clusters.remote, "--threads-per-worker", "1", "--batch-size", "4",
                 "--unit-timeout-cap", "120"]) == 0

    a, b = open_run(local_out), open_run(remote_out)
    assert b.info["store"] == stores["remote"] and b.info["checkpoint"] == checkpoint
    assert a.info["checkpoint_sha256"] == b.info["checkpoint_sha256"]  # the same hash of the same bytes
    assert a.image_ids == b.image_ids and len(a.image_ids) > 40
    for image_id in a.image_ids:
        np.testing.assert_array_equal(a.mask(image_id), b.mask(image_id))
    assert sum(int(b.mask(i).any()) for i in b.image_ids) > 40  # the masks have foreground
    cols = [c for c in a.dice_table().column_names if c != "run_id"]
    order = [("image_id", "ascending"), ("class_id", "ascending")]
    ta, tb = a.dice_table().select(cols).sort_by(order), b.dice_table().select(cols).sort_by(order)
    assert ta.num_rows > 100 and ta.equals(tb)
    # Every unit ran on the two isolated workers, none in this process.
    records = [json.loads(r) for r in fsio.read_many(fsio.list_files(fsio.join(remote_out, "units"), suffix=".json"))]
    assert len(records) == len(list((Path(local_out) / "units").glob("*.json"))) >= 4
    pids = {r["timing"]["pid"] for r in records}
    assert os.getpid() not in pids and len(pids) == 2
