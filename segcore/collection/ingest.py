"""An ingest, planned and finished: what to probe, which files are new, which groups and chunks to
write, which versions are superseded, the manifest to write, and the result record.

The reading and decoding in between (:func:`segcore.collection.sources.probe_sources` on batches of
files, :func:`segcore.collection.store.write_store_chunk` on chunks) is fanned out by the caller;
every function here runs in the caller's process. In order::

    start = start_ingest(spec)                        # pair the sources, choose what to do
    start.result                                      # set: nothing to decode (empty landing zone, store reused)
    # create (start.append is False)
    probed = probe every batch of probe_batches(spec, start.rows), concatenated
    plan = plan_creation(spec, start, probed)         # groups, chunks; creates the (empty) store
    result = finish_ingest(spec, plan, written)       # written: the rows every chunk write returned
    # append (an incremental ingest into an existing store)
    state = open_append(spec, start)                  # the manifest, and the files to probe
    plan = plan_append(spec, state, probed)           # new files, next batch, groups; appends them
    plan.result                                       # set: nothing new (the manifest is up to date)
    result = finish_ingest(spec, plan, written)       # supersedes old versions, writes the manifest
    # resume (start.resume is set: an interrupted ingest of the same files and options)
    plan = resume_plan(spec, start)                   # nothing probed: the chunks not written yet
    result = finish_ingest(spec, plan, written)

The plan of an ingest is recorded in the store before its first chunk is written, and each chunk
is marked once written (:mod:`segcore.collection.resume`), so an ingest killed in any phase
continues when run again: killed while listing or probing, the store does not exist yet; killed
later, its written chunks are kept and only the others are decoded.

Files behind fsspec URLs are staged by the probe (see :func:`probe_staging`); the caller removes
the staging directory at the end (:func:`segcore.collection.landing.remove_staging`).
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from segcore.collection.fingerprint import fold, read_fingerprint, write_fingerprint
from segcore.collection.ingest_result import IngestResult, constant_note, count_files, volume_note
from segcore.collection.incremental import (append_groups, drop_unlisted_groups, next_batch, refresh_signatures,
                                            select_new, supersede, unchanged_sources)
from segcore.collection.landing import is_remote, staging_dir, unstage_rows
from segcore.collection.resume import (IngestRecord, chunk_key, clear, differences, done_chunks, identity, read_plan,
                                       write_plan)
from segcore.collection.sources import list_and_pair, pair_sources
from segcore.collection.store import (GroupInfo, StoreInfo, chunk_rows, create_store, existing_store_matches,
                                      has_manifest, manifest_hashes_masks, open_store, plan_groups, read_manifest,
                                      spec_json, store_exists, write_manifest)
from segcore.config import IngestSpec
from segcore.errors import NotFound, StoreError

Row = dict[str, Any]


@dataclass(frozen=True)
class IngestStart:
    """What :func:`start_ingest` found: the paired source rows and what to do with them."""

    rows: tuple[Row, ...]
    append: bool = False  # an incremental ingest into a store that has a manifest
    overwrite: bool = False  # replace the store at spec.store
    result: IngestResult | None = None  # set when nothing is to be decoded
    resume: IngestRecord | None = None  # set: continue the interrupted ingest recorded in the store
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    skipped: int = 0  # files with other suffixes in the image directory


@dataclass(frozen=True)
class AppendState:
    """The store an incremental ingest appends to, and the files it must read to know what is new."""

    manifest: pa.Table
    store: StoreInfo
    to_probe: tuple[Row, ...]  # files whose signatures differ from those recorded (see unchanged_sources)
    unchanged: int


@dataclass(frozen=True)
class IngestPlan:
    """The chunks to decode, and what :func:`finish_ingest` needs to write the manifest."""

    files: int
    groups: tuple[GroupInfo, ...]  # groups to write (all of a new store's; the appended ones)
    planned: tuple[Row, ...]  # rows of the new files with ``group``/``index`` (errors: group None)
    chunks: tuple[tuple[Row, ...], ...]  # the write units, rows in index order
    batch: int
    old_manifest: pa.Table | None = None  # appending: the manifest so far (signatures refreshed)
    groups_before: int = 0
    hashed: int | None = None
    result: IngestResult | None = None  # appending and nothing new: the final result
    notes: tuple[str, ...] = ()
    kept: tuple[Row, ...] = ()  # resuming: the rows of the chunks written before, as their writes returned them
    resumed: int | None = None  # resuming: how many chunks those are
    fingerprint: dict[str, Any] | None = None  # appending: the store's fingerprint before this batch
    skipped: int = 0  # files with other suffixes in the image directory


def _nothing(spec: IngestSpec, files: int, note: str) -> IngestResult:
    return IngestResult(store=spec.store, files=files, new_files=0, images=0, errors=0, groups=0, chunks=0,
                        superseded=0, note=note)


def _has_images(images: str) -> bool:
    try:
        return bool(pair_sources(images, None))
    except NotFound:
        return False


def start_ingest(spec: IngestSpec) -> IngestStart:
    """Pair the source files and decide: create the store, resume an interrupted ingest of the same
    files and options, reuse an identical store, append to it, or (an empty landing zone) nothing.
    Raises what :func:`pair_sources` raises, except for an incremental ingest whose landing zone
    holds no image yet; raises StoreError when the store holds other sources or options (unless
    ``spec.overwrite``)."""
    try:
        paired = list_and_pair(spec.images, spec.masks)
    except NotFound as exc:
        if not spec.incremental or _has_images(spec.images):
            raise  # not a landing zone, or its masks are what is missing
        return IngestStart(rows=(), result=_nothing(spec, 0, f"the landing zone {spec.images} is empty ({exc}); "
                                                             "nothing to do"))
    rows, skipped = tuple(paired.rows), len(paired.skipped)
    found = f"{len(rows)} files found in {spec.images}"
    unpaired = _no_mask_paired(spec, rows)
    if skipped:
        names = ", ".join(p.rsplit("/", 1)[-1] for p in paired.skipped[:5]) + (", ..." if skipped > 5 else "")
        found += f"; {skipped} file(s) with other suffixes skipped ({names})"
    if store_exists(spec.store) and not has_manifest(spec.store):
        return replace(_unfinished(spec, rows, found), skipped=skipped)
    if spec.incremental and store_exists(spec.store):
        resumed = _resume_append(spec, rows, found)
        return replace(resumed or IngestStart(rows=rows, append=True, notes=(found,)), skipped=skipped)
    if not spec.overwrite and existing_store_matches(spec.store, spec=spec_json(spec), rows=rows):
        clear(spec.store)  # an ingest killed after writing its manifest left its plan behind
        ok = [r for r in read_manifest(spec.store).select(["source_path", "status"]).to_pylist() if r["status"] == "ok"]
        n_ok, errors = len(ok), len(rows) - count_files(ok)  # images (a volume's slices), files
        reused = IngestResult(store=spec.store, files=len(rows), new_files=0, images=n_ok, errors=errors,
                              groups=len(open_store(spec.store).groups), chunks=None, reused=True, skipped=skipped,
                              note=f"{spec.store} already holds these {len(rows)} files with the same options; "
                                   "reusing it (pass --overwrite to decode them again)")
        return IngestStart(rows=rows, result=reused, notes=(found,), skipped=skipped)
    return IngestStart(rows=rows, overwrite=spec.overwrite, notes=(found,), skipped=skipped, warnings=unpaired)


def _no_mask_paired(spec: IngestSpec, rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """A warning when masks were given but no image found one (names that do not match)."""
    if spec.masks is None or spec.incremental or not rows or any(r.get("mask_path") for r in rows):
        return ()
    example = str(rows[0]["source_path"]).rsplit("/", 1)[-1]
    return (f"no image has a mask in {spec.masks}: a mask is paired with the image of the same name (any supported "
            f"suffix), e.g. {example.rsplit('.', 1)[0]}.png or .tif for {example}; the images are ingested without "
            "ground truth, so no Dice is computed",)


_HOW = {"overwrite", "incremental", "wait_for_lease"}  # how to ingest, not what the store holds


def _changed_options(recorded: dict[str, Any], spec: IngestSpec) -> list[str]:
    """The options of ``spec`` that differ from those ``recorded`` (keys newer than the record: defaults)."""
    now = spec_json(spec)
    return sorted(k for k, v in recorded.items() if k not in _HOW and now.get(k) != v)


def _staged_files_gone(record: IngestRecord, done: dict[str, Any]) -> bool:
    """Whether a file staged from a URL for a chunk still to write is no longer in the staging directory."""
    planned = [r for r in record.planned if r.get("group") is not None]
    groups = [GroupInfo(**g) for g in record.groups]
    todo = [r for c in chunk_rows(planned, groups) if chunk_key(c) not in done for r in c]
    return any("source_url" in r and not Path(r["source_path"]).exists() for r in todo)


def _resuming(spec: IngestSpec, rows: tuple[Row, ...], found: str, record: IngestRecord) -> IngestStart:
    done = done_chunks(spec.store)
    total = sum(GroupInfo(**g).n_chunks for g in record.groups)
    note = (f"{spec.store} holds an interrupted ingest of the same sources (resuming: {len(done)} of {total} chunks "
            "already written)")
    return IngestStart(rows=rows, append=record.kind == "append", resume=record, notes=(found, note))


def _unfinished(spec: IngestSpec, rows: tuple[Row, ...], found: str) -> IngestStart:
    """A store without a manifest: resume its ingest when it is one of the same files and options
    (``--overwrite``: always start it again)."""
    info = open_store(spec.store)  # only ever resume or replace a segflow store
    if spec.overwrite:
        return IngestStart(rows=rows, overwrite=True, notes=(found,), warnings=(
            f"{spec.store} holds an interrupted ingest; --overwrite: starting it again",))
    record = read_plan(spec.store)
    options = _changed_options(info.spec if record is None else record.spec, spec)
    diffs = [] if record is None else differences(record, rows)
    if record is not None and record.kind == "create" and not options and not diffs:
        if not _staged_files_gone(record, done_chunks(spec.store)):
            return _resuming(spec, rows, found, record)
        return IngestStart(rows=rows, overwrite=True, notes=(found,), warnings=(
            f"{spec.store} holds an interrupted ingest of the same sources, but the files it staged from URLs "
            "are gone; starting it again",))
    if (record is None or record.kind != "create") and not options:
        return IngestStart(rows=rows, overwrite=True, notes=(found,), warnings=(
            f"{spec.store} holds an ingest interrupted before its first chunk (or by an older segflow): nothing to "
            "resume; starting it again",))
    what = "; ".join(diffs + ([f"other options: {', '.join(options)}"] if options else []))
    if spec.overwrite or spec.incremental:  # an incremental ingest cannot pass --overwrite: it starts again
        return IngestStart(rows=rows, overwrite=True, notes=(found,), warnings=(
            f"{spec.store} holds an interrupted ingest of other sources or options ({what}); replacing it",))
    raise StoreError(f"store {spec.store!r} holds an interrupted ingest of other sources or options ({what}); "
                     "run it again with the same files and options to resume it, pass --overwrite to start "
                     "again from these, or choose a new path")


def _resume_append(spec: IngestSpec, rows: tuple[Row, ...], found: str) -> IngestStart | None:
    """An interrupted incremental batch to resume; None when there is none (or the landing zone has
    changed since: then the batch is planned again, see :func:`open_append`)."""
    record = read_plan(spec.store)
    if record is None or record.kind != "append":
        return None
    if (record.batch != next_batch(read_manifest(spec.store)) or differences(record, rows)
            or _changed_options(record.spec, spec) or _staged_files_gone(record, done_chunks(spec.store))):
        return None
    return _resuming(spec, rows, found, record)


def probe_staging(store: str, rows: Sequence[Row]) -> str | None:
    """The local directory to stage files behind URLs into, or None when every file is local."""
    return str(staging_dir(store)) if any(is_remote(r["source_path"]) for r in rows) else None


def probe_batches(spec: IngestSpec, rows: Sequence[Row]) -> list[tuple[str, list[Row]]]:
    """``(label, rows)`` of every probe task: ``spec.probe_batch`` files each, in order."""
    size = spec.probe_batch
    return [(f"files {i}-{i + len(rows[i:i + size]) - 1}", list(rows[i:i + size])) for i in range(0, len(rows), size)]


def chunk_label(chunk: Sequence[Row]) -> str:
    """A write task's label: ``g000 images 0-15``."""
    return f"{chunk[0]['group']} images {chunk[0]['index']}-{chunk[-1]['index']}"


def _plan(rows: Sequence[Row], spec: IngestSpec, *, first_group: int) -> tuple[list[GroupInfo], list[Row]]:
    return plan_groups(rows, chunk_pixels=spec.chunk_pixels, max_chunk_images=spec.max_chunk_images,
                       tile_chunk=spec.tile_chunk, first_group=first_group)


def plan_creation(spec: IngestSpec, start: IngestStart, probed: Sequence[Row]) -> IngestPlan:
    """Group the probed files of a new store and create its (empty) arrays; raises StoreError when
    none of them could be read."""
    groups, planned = _plan([dict(r, batch=0) for r in probed], spec, first_group=0)
    if not groups:
        raise StoreError(f"none of the {len(start.rows)} files in {spec.images!r} could be read; first error: "
                         f"{next((r['error'] for r in probed if r['error']), 'no files')}")
    create_store(spec.store, groups, with_gt=spec.masks is not None, mask_kind=spec.mask_kind, spec=spec_json(spec),
                 overwrite=start.overwrite)
    write_plan(spec.store, IngestRecord(kind="create", spec=spec_json(spec), listed=identity(start.rows),
                                        planned=tuple(planned), groups=tuple(asdict(g) for g in groups)))
    return IngestPlan(files=len(start.rows), groups=tuple(groups), planned=tuple(planned), batch=0,
                      chunks=tuple(tuple(c) for c in chunk_rows(planned, groups)), skipped=start.skipped)


def open_append(spec: IngestSpec, start: IngestStart) -> AppendState:
    """Open the store of an incremental ingest (dropping the groups of an interrupted append) and
    pick the files to probe; raises StoreError when its masks do not match the spec's."""
    manifest = read_manifest(spec.store)
    store = drop_unlisted_groups(spec.store, manifest)  # leftovers of an interrupted append
    if (spec.masks is not None) != store.has_gt or (store.has_gt and spec.mask_kind != store.mask_kind):
        raise StoreError(f"store {spec.store!r} was ingested {'with ' + store.mask_kind if store.has_gt else 'without'}"
                         f" masks; an incremental ingest into it must give the same (masks={spec.masks!r}, "
                         f"mask_kind={spec.mask_kind!r})")
    unchanged = {id(r) for r in unchanged_sources(start.rows, manifest)}
    return AppendState(manifest=manifest, store=store, to_probe=tuple(r for r in start.rows if id(r) not in unchanged),
                       unchanged=len(unchanged))


def plan_append(spec: IngestSpec, start: IngestStart, state: AppendState, probed: Sequence[Row]) -> IngestPlan:
    """Select the new files among ``probed``, record refreshed signatures, and append the groups of
    the next batch to the store. With nothing new, the plan's ``result`` is final (the manifest
    is written here when signatures changed)."""
    unhashed = not manifest_hashes_masks(spec.store)  # written before masks were hashed
    new = select_new(probed, state.manifest, masks_unhashed=unhashed)
    manifest, refreshed = refresh_signatures(state.manifest, probed, masks_unhashed=unhashed)
    notes = (f"{refreshed} file(s) had new modification stamps (or masks recorded without a hash) but the same "
             "content; their stamps are recorded so that the next run does not read them again",) if refreshed else ()
    if not new:
        if refreshed:
            write_manifest(spec.store, manifest.to_pylist())
        note = (f"nothing new in {spec.images}: all {len(start.rows)} file(s) are already in {spec.store} "
                f"({state.unchanged} unchanged since their ingest, {len(probed)} hashed)")
        result = IngestResult(store=spec.store, files=len(start.rows), new_files=0, images=0, errors=0,
                              groups=len(state.store.groups), chunks=0, superseded=0, hashed=len(probed),
                              skipped=start.skipped, note=note)
        return IngestPlan(files=len(start.rows), groups=(), planned=(), chunks=(), batch=next_batch(manifest),
                          hashed=len(probed), result=result, notes=notes)
    batch = next_batch(manifest)
    groups, planned = _plan([dict(r, batch=batch) for r in new], spec, first_group=len(state.store.groups))
    fingerprint = read_fingerprint(spec.store)
    clear(spec.store)  # the markers of an interrupted batch that is planned again
    if groups:
        append_groups(spec.store, groups)
    write_plan(spec.store, IngestRecord(kind="append", spec=spec_json(spec), listed=identity(start.rows),
                                        planned=tuple(planned), groups=tuple(asdict(g) for g in groups), batch=batch,
                                        groups_before=len(state.store.groups), probed=tuple(probed),
                                        fingerprint=fingerprint))
    return IngestPlan(files=len(start.rows), groups=tuple(groups), planned=tuple(planned), batch=batch,
                      chunks=tuple(tuple(c) for c in chunk_rows(planned, groups)), old_manifest=manifest,
                      groups_before=len(state.store.groups), hashed=len(probed), notes=notes, fingerprint=fingerprint,
                      skipped=start.skipped)


def resume_plan(spec: IngestSpec, start: IngestStart) -> IngestPlan:
    """The plan of the interrupted ingest recorded in the store (``start.resume``): its chunks not marked
    written yet, and the rows of those that are. Nothing is probed or hashed again."""
    record = start.resume
    if record is None:
        raise StoreError("resume_plan needs the start of a resumed ingest (start_ingest found none to resume)")
    groups = tuple(GroupInfo(**g) for g in record.groups)
    chunks = [tuple(c) for c in chunk_rows(record.planned, groups)]
    done = done_chunks(spec.store)
    kept = tuple(r for c in chunks if chunk_key(c) in done for r in done[chunk_key(c)])
    todo = tuple(c for c in chunks if chunk_key(c) not in done)
    old = None
    if record.kind == "append":  # the old manifest as the interrupted run saw it, signatures refreshed
        unhashed = not manifest_hashes_masks(spec.store)
        old = refresh_signatures(read_manifest(spec.store), record.probed, masks_unhashed=unhashed)[0]
    return IngestPlan(files=len(start.rows), groups=groups, planned=record.planned, chunks=todo, batch=record.batch,
                      old_manifest=old, groups_before=record.groups_before, hashed=0, kept=kept,
                      resumed=len(chunks) - len(todo), fingerprint=record.fingerprint,
                      skipped=start.skipped)


def unreadable_note(store: str, *, batch: int | None = None, show: int = 3) -> str | None:
    """``"2 file(s) could not be read and are error rows of the manifest: a.png (why), ..."`` for the
    error rows of ``store``'s manifest (of ``batch`` only, when given; a volume's file once), or None
    when there are none."""
    rows = read_manifest(store).select(["source_path", "status", "error", "batch"]).to_pylist()
    bad = {r["source_path"]: r["error"] for r in rows
           if r["status"] == "error" and (batch is None or r["batch"] == batch)}
    return _files_note(bad, "file(s) could not be read and are error rows of the manifest", show=show)


def unusable_masks_note(store: str, *, batch: int | None = None, show: int = 3) -> str | None:
    """``"1 mask(s) could not be used, ...: m.nii.gz (why)"`` for the readable images of ``store``'s
    manifest (of ``batch`` only, when given) whose mask was found but refused (``mask_status``
    ``error``: another shape, unreadable, not labels; a volume's mask once), or None when none."""
    rows = read_manifest(store).select(["mask_path", "status", "mask_status", "mask_error", "batch"]).to_pylist()
    bad = {r["mask_path"]: r["mask_error"] for r in rows
           if r["status"] == "ok" and r["mask_status"] == "error" and (batch is None or r["batch"] == batch)}
    return _files_note(bad, "mask(s) could not be used, so their images have no ground truth", show=show)


def _files_note(bad: dict[str, Any], what: str, *, show: int) -> str | None:
    """``"N <what>: name (why); ..."`` of ``bad`` (path -> reason), or None when empty."""
    if not bad:
        return None
    named = "; ".join(f"{str(path).rsplit('/', 1)[-1]} ({textwrap.shorten(str(why), 240, placeholder=' ...')})"
                      for path, why in list(bad.items())[:show])  # whole words: a reason is never cut mid-word
    return f"{len(bad)} {what}: {named}" + ("; ..." if len(bad) > show else "")


def finish_ingest(spec: IngestSpec, plan: IngestPlan, written: Sequence[Row], *, seconds: float) -> IngestResult:
    """Write the manifest: the old rows (appending: with ``superseded_by`` set where a new readable
    version of the same id was written), then the rows of the chunks kept from an interrupted run
    (resuming) and the ``written`` rows (what this run's chunk writes returned), and the rows of
    files that could not be read. The fingerprint is recorded first and the plan removed last, so
    an ingest killed in between resumes. Returns the result."""
    decoded = len(written)
    written = sorted(list(plan.kept) + list(written), key=lambda r: (r["group"], r["index"]))
    errors = [r for r in plan.planned if r["group"] is None]
    old = [] if plan.old_manifest is None else supersede(plan.old_manifest, written)
    write_fingerprint(spec.store, fold(written, None if plan.old_manifest is None else plan.fingerprint))
    write_manifest(spec.store, old + unstage_rows(written + errors))
    clear(spec.store)
    n_new = count_files(plan.planned)  # files: a volume has a row per slice
    n_ok = sum(1 for r in written if r["status"] == "ok")
    ok_files = count_files([r for r in written if r["status"] == "ok"])
    slices = volume_note(written)
    chunks = len(plan.chunks)
    resume = {} if plan.resumed is None else {"resumed": plan.resumed, "decoded": decoded, "hashed": 0}
    how = "" if plan.resumed is None else (f"resumed an interrupted ingest: {plan.resumed} chunk(s) kept, {chunks} "
                                           f"written now ({decoded} file(s) decoded); ")
    constant = [r for r in written if r["status"] == "ok" and r.get("value_min") is not None
                and r["value_min"] == r["value_max"]]
    extra = dict(skipped=plan.skipped, constant_images=len(constant))
    also = constant_note(constant) + (f"; {plan.skipped} file(s) with other suffixes skipped" if plan.skipped else "")
    if plan.old_manifest is None:
        return IngestResult(store=spec.store, files=plan.files, new_files=plan.files, images=n_ok,
                            errors=plan.files - ok_files, groups=len(plan.groups), chunks=chunks, **resume, **extra,
                            note=f"{how}{n_ok} images{slices} in {len(plan.groups)} group(s), "
                                 f"{chunks + (plan.resumed or 0)} chunk(s); {plan.files - ok_files} file(s) with errors"
                                 f"{also}; {seconds:.1f} s -> {spec.store}")
    n_sup = plan.old_manifest.column("superseded_by").null_count - sum(1 for r in old if r["superseded_by"] is None)
    return IngestResult(store=spec.store, files=plan.files, new_files=n_new, images=n_ok, errors=n_new - ok_files,
                        groups=plan.groups_before + len(plan.groups), chunks=chunks, superseded=n_sup,
                        hashed=plan.hashed, batch=plan.batch, **{k: v for k, v in resume.items() if k != "hashed"},
                        **extra,
                        note=f"{how}batch {plan.batch}: {n_new} new file(s) of {plan.files} in {spec.images}: {n_ok} "
                             f"image(s){slices} in {len(plan.groups)} new group(s), {n_new - ok_files} file(s) with "
                             f"errors, {n_sup} older "
                             f"version(s) superseded{also}; {seconds:.1f} s")
