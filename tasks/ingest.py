"""Thin Prefect tasks of the ingest: each calls one segcore function on one batch or chunk."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from segcore.collection import landing
from segcore.collection import sources
from segcore.collection import store


@task(name="probe-files", task_run_name="probe-files [{label}]", cache_policy=NO_CACHE, retries=1,
      retry_delay_seconds=2)
def probe_files(rows: list[dict[str, Any]], label: str, staging: str | None = None) -> list[dict[str, Any]]:
    """Read headers and hash the files of one batch (rows from ``segcore.collection.sources.pair_sources``);
    files behind URLs are first copied into the local ``staging`` directory."""
    return sources.probe_sources(landing.stage_rows(rows, staging) if staging else rows)


@task(name="write-chunk", task_run_name="write-chunk [{label}]", cache_policy=NO_CACHE, retries=1,
      retry_delay_seconds=2)
def write_chunk(store_path: str, rows: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Decode one chunk's images and masks into the store; returns the rows with final status."""
    return store.write_store_chunk(store_path, rows)
