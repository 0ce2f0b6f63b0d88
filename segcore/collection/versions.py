"""Which manifest row is the *current version* of an image: the one rule, in Python and in SQL.

An image id can have several versions (manifest rows): an incremental ingest (see
:mod:`segcore.collection.incremental`) adds a row, in a new ``batch``, when the file of a known id
changed in place or came with a corrected mask, and sets ``superseded_by`` on the old readable
row of that id in the same manifest write. The rule:

    a manifest row is current when its ``superseded_by`` is null; that is, unless it is readable
    (``status == "ok"``) and a newer readable version of its id exists (a row of a higher
    ``batch``, null counting as 0, with ``status == "ok"`` and a slot, ``group`` not null). A
    slice of a volume is also replaced by a newer readable slice of the same volume (a volume
    file rewritten with fewer slices leaves none of its old slices current).

Rows of run tables (Dice, instances) belong to the version of their slot ``(group of the unit,
image_id)``. :func:`current_manifest` and :func:`current_rows` apply the rule in Python, from the
recorded ``superseded_by``; :data:`CURRENT_VERSION_SQL` states it in SQL from batches and statuses
instead, because the lake's manifest parts are snapshots published before later supersessions
(their ``superseded_by`` is never updated). On every manifest an ingest writes, both select the
same rows (tests/segcore/collection/test_versions.py).
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

#: The rule as a DuckDB predicate on a manifest row aliased ``{row}`` (columns ``image_id``,
#: ``volume_id``, ``batch``, ``status``): it is not a readable version that a newer readable version of its image
#: in the relation ``{versions}`` (manifest rows) replaced. ``{match}`` adds columns that must be
#: equal too (over the lake: ``model``, so that each model is judged on the versions it was given).
CURRENT_VERSION_SQL = """not ({row}.status = 'ok' and exists (
    select 1 from {versions} as newer
    where (newer.image_id = {row}.image_id or newer.volume_id = {row}.volume_id){match} and newer.status = 'ok'
      and newer."group" is not null
      and coalesce(newer.batch, 0) > coalesce({row}.batch, 0)))"""


def current_version_sql(*, row: str, versions: str = "manifest", match: Sequence[str] = ()) -> str:
    """:data:`CURRENT_VERSION_SQL` for the row alias ``row`` against the relation ``versions``,
    with the extra columns ``match`` equal on both sides (e.g. ``("model",)`` over the lake)."""
    extra = "".join(f" and newer.{c} = {row}.{c}" for c in match)
    return CURRENT_VERSION_SQL.format(row=row, versions=versions, match=extra)


def current_manifest(manifest: pa.Table) -> pa.Table:
    """The rows of ``manifest`` (see ``MANIFEST_SCHEMA``) that are current versions; rows of files
    that could not be read are never superseded, so they stay."""
    return manifest.filter(pc.is_null(manifest.column("superseded_by")))


def superseded_slots(manifest: pa.Table) -> set[tuple[str, str]]:
    """``{(group, image_id)}`` of image versions replaced by newer content."""
    old = manifest.filter(pc.is_valid(manifest.column("superseded_by"))).select(["group", "image_id"]).to_pylist()
    return {(r["group"], r["image_id"]) for r in old if r["group"] is not None}


def current_rows(table: pa.Table, manifest: pa.Table, unit_groups: dict[str, str]) -> pa.Table:
    """Rows of a run table (``image_id`` + ``unit`` columns) that belong to current image versions.

    ``unit_groups`` maps every table part (units ``unit-00042`` and tiled-image parts ``g001-000000``)
    to its store group, as the run's plan records them (:meth:`segcore.run.plan.RunPlan.part_groups`).
    """
    old = superseded_slots(manifest)
    if not old or table.num_rows == 0:
        return table
    keep = [(unit_groups[u], i) not in old
            for u, i in zip(table.column("unit").to_pylist(), table.column("image_id").to_pylist())]
    return table.filter(pa.array(keep, pa.bool_()))
