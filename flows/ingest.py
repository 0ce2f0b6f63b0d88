"""The ingest steps: pair and probe source files, plan groups, decode chunks, write the manifest.

A full ingest creates the store (or reuses an identical one); an incremental ingest appends the
landing zone's new files to it (see :mod:`segcore.collection.incremental`). Files behind fsspec URLs are
staged locally first (:mod:`segcore.collection.landing`).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger
from prefect.futures import as_completed

from segcore.config import IngestSpec
from segcore.errors import NotFound, StoreError
from segcore.collection.incremental import (append_groups, drop_unlisted_groups, next_batch, refresh_signatures, select_new,
                                 supersede, unchanged_sources)
from segcore.collection.landing import is_remote, remove_staging, staging_dir, unstage_rows
from segcore.collection.sources import pair_sources
from segcore.collection.store import (chunk_rows, create_store, existing_store_matches, has_manifest, manifest_hashes_masks,
                           open_store, plan_groups, read_manifest, spec_json, store_exists, write_manifest)
from tasks.ingest import probe_files, write_chunk
from tasks.progress import report


def _probe(spec: IngestSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Read headers and hash contents, ``probe_batch`` files per task (files behind URLs are staged)."""
    staging = str(staging_dir(spec.store)) if any(is_remote(r["source_path"]) for r in rows) else None
    batches = [rows[i:i + spec.probe_batch] for i in range(0, len(rows), spec.probe_batch)]
    futures = [probe_files.submit(b, label=f"files {i * spec.probe_batch}-{i * spec.probe_batch + len(b) - 1}",
                                  staging=staging) for i, b in enumerate(batches)]
    return [r for f in futures for r in f.result()]


def _write_chunks(spec: IngestSpec, planned: list[dict[str, Any]], groups: list, log: Any) -> list[dict[str, Any]]:
    """Decode and write every chunk of ``groups``; returns the written rows with their final status."""
    chunks = chunk_rows(planned, groups)
    futures = [write_chunk.submit(spec.store, c, label=f"{c[0]['group']} images {c[0]['index']}-{c[-1]['index']}")
               for c in chunks]
    written: list[dict[str, Any]] = []
    for n, fut in enumerate(as_completed(futures), start=1):
        written.extend(fut.result())
        report("ingest", n, len(futures), f"{len(written)} images")
        if n % max(1, len(futures) // 10) == 0 or n == len(futures):
            log.info("ingest: %d/%d chunks written", n, len(futures))
    return sorted(written, key=lambda r: (r["group"], r["index"]))


def _ingest_new(spec: IngestSpec, rows: list[dict[str, Any]], log: Any, t0: float) -> dict[str, Any]:
    """Incremental ingest: append the landing-zone files whose content the store has not seen."""
    manifest = read_manifest(spec.store)
    store = drop_unlisted_groups(spec.store, manifest)  # leftovers of an interrupted append
    if (spec.masks is not None) != store.has_gt or (store.has_gt and spec.mask_kind != store.mask_kind):
        raise StoreError(f"store {spec.store!r} was ingested {'with ' + store.mask_kind if store.has_gt else 'without'}"
                         f" masks; an incremental ingest into it must give the same (masks={spec.masks!r}, "
                         f"mask_kind={spec.mask_kind!r})")
    unchanged = {id(r) for r in unchanged_sources(rows, manifest)}
    probed = _probe(spec, [r for r in rows if id(r) not in unchanged])
    unhashed = not manifest_hashes_masks(spec.store)  # written before masks were hashed
    new = select_new(probed, manifest, masks_unhashed=unhashed)
    manifest, refreshed = refresh_signatures(manifest, probed, masks_unhashed=unhashed)
    result = {"store": spec.store, "files": len(rows), "new_files": len(new), "images": 0, "errors": 0,
              "groups": len(store.groups), "chunks": 0, "superseded": 0, "hashed": len(probed)}
    if refreshed:
        log.info("ingest: %d file(s) had new modification stamps (or masks recorded without a hash) but the same "
                 "content; their stamps are recorded so that the next run does not read them again", refreshed)
    if not new:
        if refreshed:
            write_manifest(spec.store, manifest.to_pylist())
        log.info("ingest: nothing new in %s: all %d file(s) are already in %s (%d unchanged since their ingest, "
                 "%d hashed; %.1f s)", spec.images, len(rows), spec.store, len(unchanged), len(probed),
                 time.perf_counter() - t0)
        return result
    batch = next_batch(manifest)
    groups, planned = plan_groups([dict(r, batch=batch) for r in new], chunk_pixels=spec.chunk_pixels,
                                  max_chunk_images=spec.max_chunk_images, tile_chunk=spec.tile_chunk,
                                  first_group=len(store.groups))
    if groups:
        append_groups(spec.store, groups)
    written = _write_chunks(spec, planned, groups, log)
    errors = [r for r in planned if r["group"] is None]
    old = supersede(manifest, written)
    write_manifest(spec.store, old + unstage_rows(written + errors))
    n_ok = sum(1 for r in written if r["status"] == "ok")
    n_sup = manifest.column("superseded_by").null_count - sum(1 for r in old if r["superseded_by"] is None)
    result.update(images=n_ok, errors=len(new) - n_ok, groups=len(store.groups) + len(groups),
                  chunks=sum(g.n_chunks for g in groups), superseded=n_sup, batch=batch)
    log.info("ingest: batch %d: %d new file(s) of %d in %s: %d image(s) in %d new group(s), %d error row(s), "
             "%d older version(s) superseded; %.1f s", batch, len(new), len(rows), spec.images, n_ok, len(groups),
             len(new) - n_ok, n_sup, time.perf_counter() - t0)
    return result


def ingest_steps(spec: IngestSpec) -> dict[str, Any]:
    """Pair, probe (in batches), plan groups, create the store, decode chunks, write the manifest.

    With ``spec.incremental`` and an existing store, only files with new content are appended
    (see :mod:`segcore.collection.incremental`); the result's ``new_files`` says how many.
    """
    try:
        return _ingest(spec)
    finally:
        remove_staging(spec.store)


def _nothing(spec: IngestSpec, files: int) -> dict[str, Any]:
    return {"store": spec.store, "files": files, "new_files": 0, "images": 0, "errors": 0, "groups": 0, "chunks": 0,
            "superseded": 0}


def _has_images(images: str) -> bool:
    try:
        return bool(pair_sources(images, None))
    except NotFound:
        return False


def _ingest(spec: IngestSpec) -> dict[str, Any]:
    log = get_run_logger()
    t0 = time.perf_counter()
    overwrite = spec.overwrite
    try:
        rows = pair_sources(spec.images, spec.masks)
    except NotFound as exc:
        if not spec.incremental or _has_images(spec.images):
            raise  # not a landing zone, or its masks are what is missing
        log.info("ingest: the landing zone %s is empty (%s); nothing to do", spec.images, exc)
        return _nothing(spec, 0)
    log.info("ingest: %d files found in %s", len(rows), spec.images)
    if spec.incremental and store_exists(spec.store):
        if has_manifest(spec.store):
            return _ingest_new(spec, rows, log, t0)
        open_store(spec.store)  # only ever replace a segflow store
        log.warning("ingest: %s has no manifest (its first ingest was interrupted); creating it again", spec.store)
        overwrite = True
    if not overwrite and existing_store_matches(spec.store, spec=spec_json(spec),
                                                     source_paths=[r["source_path"] for r in rows]):
        manifest = read_manifest(spec.store)
        n_ok = sum(1 for s in manifest.column("status").to_pylist() if s == "ok")
        log.info("ingest: %s already holds these %d files with the same options; reusing it (pass --overwrite "
                 "to decode them again)", spec.store, len(rows))
        return {"store": spec.store, "files": len(rows), "new_files": 0, "images": n_ok, "errors": len(rows) - n_ok,
                "groups": len(open_store(spec.store).groups), "chunks": None, "reused": True}
    probed = [dict(r, batch=0) for r in _probe(spec, rows)]
    groups, planned = plan_groups(probed, chunk_pixels=spec.chunk_pixels, max_chunk_images=spec.max_chunk_images,
                                  tile_chunk=spec.tile_chunk)
    if not groups:
        raise StoreError(f"none of the {len(rows)} files in {spec.images!r} could be read; first error: "
                         f"{next((r['error'] for r in probed if r['error']), 'no files')}")
    with_gt = spec.masks is not None
    create_store(spec.store, groups, with_gt=with_gt, mask_kind=spec.mask_kind, spec=spec_json(spec),
                 overwrite=overwrite)
    written = _write_chunks(spec, planned, groups, log)
    errors = [r for r in planned if r["group"] is None]
    write_manifest(spec.store, unstage_rows(written + errors))
    n_ok = sum(1 for r in written if r["status"] == "ok")
    n_err = len(rows) - n_ok
    log.info("ingest: %d images in %d group(s), %d chunk(s); %d error row(s); %.1f s -> %s",
             n_ok, len(groups), sum(g.n_chunks for g in groups), n_err, time.perf_counter() - t0, spec.store)
    return {"store": spec.store, "files": len(rows), "new_files": len(rows), "images": n_ok, "errors": n_err,
            "groups": len(groups), "chunks": sum(g.n_chunks for g in groups)}
