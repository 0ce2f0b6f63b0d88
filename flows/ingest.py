"""The ingest flow steps: pair and probe source files, plan groups, decode chunks, write the manifest.

Composition only: :mod:`segcore.collection.ingest` decides what to probe, what is new, which
groups and chunks to write and which manifest to write; this module fans the probing and the chunk
writes out as tasks and gathers them. A full ingest creates the store (or reuses an identical
one); an incremental ingest appends the landing zone's new files to it (see
:mod:`segcore.collection.incremental`). Re-run after an interruption, an ingest resumes: the chunks
it had written are kept and only the others are decoded (:mod:`segcore.collection.resume`). Files behind fsspec URLs are staged locally first
(:mod:`segcore.collection.landing`).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger
from prefect.futures import as_completed

from segcore.collection.ingest import (IngestPlan, IngestResult, IngestStart, chunk_label, finish_ingest, open_append,
                                       plan_append, plan_creation, probe_batches, probe_staging, resume_plan,
                                       start_ingest, unreadable_note, unusable_masks_note)
from segcore.collection.landing import remove_staging
from segcore.config import IngestSpec
from segcore.lease import Lease, store_lease
from tasks.ingest import probe_files, write_chunk
from tasks.progress import report


def _probe(spec: IngestSpec, rows: Any) -> list[dict[str, Any]]:
    """Read headers and hash contents, ``probe_batch`` files per task (files behind URLs are staged)."""
    staging = probe_staging(spec.store, rows)
    futures = [probe_files.submit(batch, label=label, staging=staging) for label, batch in probe_batches(spec, rows)]
    return [r for f in futures for r in f.result()]


def _write_chunks(spec: IngestSpec, plan: IngestPlan, log: Any) -> list[dict[str, Any]]:
    """Decode and write every chunk of the plan; returns the written rows with their final status."""
    futures = [write_chunk.submit(spec.store, list(c), label=chunk_label(c)) for c in plan.chunks]
    written: list[dict[str, Any]] = []
    ok = 0
    for n, fut in enumerate(as_completed(futures), start=1):
        rows = fut.result()
        written.extend(rows)
        ok += sum(r["status"] == "ok" for r in rows)
        refused = len(written) - ok  # decoded but refused (a NaN pixel, ...): error rows of the manifest
        report("ingest", n, len(futures), f"{ok} images" + (f", {refused} refused" if refused else ""))
        if n % max(1, len(futures) // 10) == 0 or n == len(futures):
            log.info("ingest: %d/%d chunks written", n, len(futures))
    return written


def ingest_steps(spec: IngestSpec) -> dict[str, Any]:
    """Pair, probe (in batches), plan groups, create the store, decode chunks, write the manifest.

    With ``spec.incremental`` and an existing store, only files with new content are appended
    (see :mod:`segcore.collection.incremental`); the result's ``new_files`` says how many.
    """
    with Lease(store_lease(spec.store), what=f"store {spec.store}", doing="ingested", option="--store",
               wait_s=spec.wait_for_lease):  # one ingest per store; a refused one leaves the holder's staging alone
        try:
            return _ingest(spec).to_dict()
        finally:
            remove_staging(spec.store)


def _plan(spec: IngestSpec, start: IngestStart) -> IngestPlan:
    """Probe what must be read, then plan the new store or the append (resuming: the chunks left to write)."""
    if start.resume is not None:
        return resume_plan(spec, start)
    if start.append:
        state = open_append(spec, start)
        return plan_append(spec, start, state, _probe(spec, state.to_probe))
    return plan_creation(spec, start, _probe(spec, start.rows))


def _ingest(spec: IngestSpec) -> IngestResult:
    log, t0 = get_run_logger(), time.perf_counter()
    start = start_ingest(spec)
    for note in start.notes:
        log.info("ingest: %s", note)
    for warning in start.warnings:
        log.warning("ingest: %s", warning)
    if start.result is not None:  # an empty landing zone, or an identical store
        log.info("ingest: %s", start.result.note)
        return start.result
    plan = _plan(spec, start)
    for note in plan.notes:
        log.info("ingest: %s", note)
    if plan.result is not None:  # nothing new in the landing zone
        log.info("ingest: %s; %.1f s", plan.result.note, time.perf_counter() - t0)
        return plan.result
    result = finish_ingest(spec, plan, _write_chunks(spec, plan, log), seconds=time.perf_counter() - t0)
    log.info("ingest: %s", result.note)
    if result.errors:
        log.warning("ingest: %s", unreadable_note(spec.store, batch=result.batch))
    masks = unusable_masks_note(spec.store, batch=result.batch) if spec.masks else None
    if masks:
        log.warning("ingest: %s", masks)
    return result
