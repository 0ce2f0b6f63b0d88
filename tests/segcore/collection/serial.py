"""An ingest run serially in one process from the steps of segcore.collection.ingest (what the
flow fans out as tasks), for tests without Prefect."""

from __future__ import annotations

from segcore.collection.ingest import (IngestResult, finish_ingest, open_append, plan_append, plan_creation,
                                       probe_batches, resume_plan, start_ingest)
from segcore.collection.sources import probe_sources
from segcore.collection.store import write_store_chunk
from segcore.config import IngestSpec


def _probe(spec: IngestSpec, rows) -> list[dict]:
    return [r for _, batch in probe_batches(spec, rows) for r in probe_sources(batch)]


def ingest_serially(spec: IngestSpec) -> IngestResult:
    """:func:`flows.ingest.ingest_steps` without tasks (local files only)."""
    start = start_ingest(spec)
    if start.result is not None:
        return start.result
    if start.resume is not None:
        plan = resume_plan(spec, start)
    elif start.append:
        state = open_append(spec, start)
        plan = plan_append(spec, start, state, _probe(spec, state.to_probe))
        if plan.result is not None:
            return plan.result
    else:
        plan = plan_creation(spec, start, _probe(spec, start.rows))
    written = [r for chunk in plan.chunks for r in write_store_chunk(spec.store, list(chunk), threads=1)]
    return finish_ingest(spec, plan, written, seconds=0.0)
