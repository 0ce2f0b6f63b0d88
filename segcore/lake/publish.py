"""The data lake: append-only, Hive-partitioned Parquet tables that analysts query.

Layout of ``LAKE`` (a path or any fsspec URL)::

    dice/run_date=2026-11-24/model=unet/<run_id>-unit-00042.parquet
    instances/run_date=.../model=.../<run_id>-<part>.parquet          (instance models)
    instance_metrics/run_date=.../model=.../<run_id>-<part>.parquet   (instance ground truth)
    manifest/run_date=.../model=.../<run_id>-batch-00003.parquet      the files of one ingest batch
    volumes/run_date=.../model=.../<run_id>-volumes-<stamp>-00000.parquet  per-volume 3-D metrics (volumes)

``run_date`` (UTC day of publication) and ``model`` (architecture name) live in the directory
names only (the Hive convention): DuckDB (``hive_partitioning = true``), pyarrow.dataset
(``partitioning="hive"``), Spark and pandas add them back as columns; checkpoints of one
architecture share a ``model`` partition and differ in ``checkpoint_sha256`` (a column of every run
table), which :mod:`segcore.lake.report` uses to tell models apart. Columns are those of the
run tables (:mod:`segcore.run.tables`, less ``model``) plus lineage: ``run_id`` (the run directory),
``store`` (the location of the store the run segmented, as its ``run.json`` records it: image ids
are unique within a store only; null in files published before the column existed),
``checkpoint`` (the location of the run's checkpoint as its ``run.json`` records it; null in files
published before the column existed), ``ingest_batch``, ``source_path``, ``source_sha256``,
``mask_sha256`` (the ground truth the row was scored against) and ``published_at``; see
:func:`lake_schema`. Manifest parts carry
``run_id``, ``store`` and ``published_at`` too. URLs (in ``store``, ``checkpoint``, ``source_path``,
``mask_path``, and in the schema metadata's run spec and model record, such as a training command
line) are recorded without credentials, query or fragment (:func:`public`; files published
before that may hold them in ``store``, ``source_path``, ``mask_path`` and the metadata, and the
report compares stores without them).
Manifest parts are snapshots of a batch as published (a later supersession shows as a newer row
of the same ``image_id``). A run scores its volumes again at its end each time it runs (an incremental
run: with the new slices), so the volume rows of a volume's latest ``published_at`` are current;
their lineage is the volume's file.
Every file's Parquet schema metadata holds ``segflow`` = JSON with the segflow version, lake
format, table name, run id, checkpoint sha256 and the run's spec.

Runs only ever add files, each with a name of its own, and never rewrite old ones; every file
appears whole (see :mod:`segcore.fsio`), so a reader globbing the dataset while a run writes sees
a consistent set of whole files. Which run-directory parts are already in the lake is recorded
in ``RUN_DIR/lake.json``, so publishing again (a resumed or scheduled run) adds only new parts,
and an interrupted publication rewrites the same files rather than adding copies.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from segcore import __version__
from segcore import fsio
from segcore.errors import LakeError
from segcore.run.rundir import read_plan, read_run_info
from segcore.collection.store import MANIFEST_SCHEMA, read_manifest
from segcore.run.tables import DICE_SCHEMA, INSTANCE_METRICS_SCHEMA, INSTANCE_SCHEMA, read_hive
from segcore.run.volumes import VOLUME_SCHEMA

LAKE_FORMAT = 1
PARTITIONS = pa.schema([("run_date", pa.string()), ("model", pa.string())])
RUN_TABLES = {"dice": DICE_SCHEMA, "instances": INSTANCE_SCHEMA, "instance_metrics": INSTANCE_METRICS_SCHEMA,
              "volumes": VOLUME_SCHEMA}
LAKE_TABLES = (*RUN_TABLES, "manifest")
_LINEAGE = [("run_id", pa.string()), ("store", pa.string()), ("checkpoint", pa.string()),
            ("ingest_batch", pa.int64()), ("source_path", pa.string()),
            ("source_sha256", pa.string()), ("mask_sha256", pa.string()),
            ("published_at", pa.timestamp("us", tz="UTC"))]


def lake_schema(table: str) -> pa.Schema:
    """Schema of the files of lake table ``table`` (partition columns not included)."""
    if table == "manifest":
        return pa.schema(list(MANIFEST_SCHEMA) + [pa.field("run_id", pa.string()), pa.field("store", pa.string()),
                                                  pa.field("published_at", _LINEAGE[-1][1])])
    if table not in RUN_TABLES:
        raise KeyError(f"unknown lake table {table!r}; tables: {', '.join(LAKE_TABLES)}")
    base = [f for f in RUN_TABLES[table] if f.name != "model"]
    return pa.schema(base + [pa.field(n, t) for n, t in _LINEAGE])


def lake_columns(table: str) -> tuple[str, ...]:
    """Columns of a lake table as read back: partition columns first."""
    return tuple(PARTITIONS.names) + tuple(lake_schema(table).names)


def public(value: Any) -> Any:
    """``value`` (a location, a command line, or JSON such as a run spec or a model's metadata) with
    every URL in it stripped of credentials, query and fragment (:func:`segcore.fsio.without_secrets`):
    what the lake records, where others read it."""
    if isinstance(value, str):
        return fsio.without_secrets(value)
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public(v) for v in value]
    return value


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


#: DuckDB: the store of a lake row as :func:`public` records it, for rows published before it did
#: (the same regular expressions, :data:`segcore.fsio.URL_CREDENTIALS` and :data:`~segcore.fsio.URL_QUERY`).
PUBLIC_STORE_SQL = (f"regexp_replace(regexp_replace(coalesce({{t}}.store, ''), {_sql_text(fsio.URL_CREDENTIALS)}, "
                    rf"'\1', 'g'), {_sql_text(fsio.URL_QUERY)}, '\1', 'g')")


def _metadata(table: str, *, run_info: dict[str, Any]) -> dict[bytes, bytes]:
    meta = {"version": __version__, "lake_format": LAKE_FORMAT, "table": table, "run_id": run_info["run_id"],
            "checkpoint_sha256": run_info["checkpoint_sha256"], "model": public(run_info["model"]),
            "run_spec": public(run_info.get("spec"))}
    return {b"segflow": json.dumps(meta, sort_keys=True, default=str).encode()}


def _write(location: str, table: pa.Table, name: str, run_info: dict[str, Any]) -> None:
    table = table.replace_schema_metadata(_metadata(name, run_info=run_info))
    fsio.write_bytes(location, fsio.to_buffer(lambda f: pq.write_table(table, f)))


def _lineage(table: pa.Table, found: Sequence[dict[str, Any]], *, run_id: str, store: str | None,
             checkpoint: str | None, published_at: dt.datetime, name: str) -> pa.Table:
    """``table`` with the lineage columns of the manifest rows ``found`` (one per row; ``{}``: none)."""
    extra = {
        "run_id": pa.array([run_id] * table.num_rows, pa.string()),
        "store": pa.array([store] * table.num_rows, pa.string()),
        "checkpoint": pa.array([checkpoint] * table.num_rows, pa.string()),
        "ingest_batch": pa.array([f.get("batch") for f in found], pa.int64()),
        "source_path": pa.array([public(f.get("source_path")) for f in found], pa.string()),
        "source_sha256": pa.array([f.get("sha256") for f in found], pa.string()),
        "mask_sha256": pa.array([f.get("mask_sha256") for f in found], pa.string()),
        "published_at": pa.array([published_at] * table.num_rows, _LINEAGE[-1][1]),
    }
    if "model" in table.column_names:
        table = table.drop_columns(["model"])
    for col, values in extra.items():
        table = table.append_column(col, values)
    return table.select(lake_schema(name).names).cast(lake_schema(name))


def _ledger_path(run_dir: str) -> str:
    return fsio.join(run_dir, "lake.json")


def _lake_key(lake: str) -> str:
    """One spelling per lake (``lake``, ``./lake/`` and ``/abs/lake`` are the same lake)."""
    return os.path.abspath(lake) if fsio.is_local(lake) and "://" not in lake else lake.rstrip("/")


def _read_ledger(run_dir: str, lake: str) -> dict[str, Any]:
    path = _ledger_path(run_dir)
    ledgers = fsio.read_json(path) if fsio.exists(path) else {}
    return ledgers.get(_lake_key(lake), {"parts": {}})


def _save_ledger(run_dir: str, lake: str, ledger: dict[str, Any]) -> None:
    path = _ledger_path(run_dir)
    ledgers = fsio.read_json(path) if fsio.exists(path) else {}
    ledgers[_lake_key(lake)] = ledger
    fsio.write_json(path, ledgers)


def publish(lake: str, *, run_dir: str, run_info: dict[str, Any], manifest: pa.Table, unit_groups: dict[str, str],
            now: dt.datetime | None = None) -> dict[str, int]:
    """Append to ``lake`` every table part of ``run_dir`` (and every manifest batch) not published yet.

    ``run_info`` is the run's ``run.json``; ``unit_groups`` maps every table part (units and the parts of
    tiled images) to its store group, as the run's plan records them
    (:meth:`segcore.run.plan.RunPlan.part_groups`). Returns the number of files written per table.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    run_id, model, store = run_info["run_id"], run_info["model"]["arch"], public(run_info.get("store"))
    ledger = _read_ledger(run_dir, lake)
    pending: dict[str, str] = {}
    for name in RUN_TABLES:
        base = fsio.join(run_dir, name, f"run_id={run_id}")
        for part in fsio.list_files(base, suffix=".parquet", recursive=False):
            key = f"{name}/{part.rsplit('/', 1)[-1]}"
            if not ledger["parts"].get(key, {}).get("done"):
                pending[key] = part
    batches = sorted({b for b in manifest.column("batch").to_pylist() if b is not None})
    for b in batches:
        if not ledger["parts"].get(f"manifest/batch-{b:05d}", {}).get("done"):
            pending[f"manifest/batch-{b:05d}"] = ""
    if not pending:
        return {}
    # Record the targets first: a publication interrupted half-way rewrites the same files next time.
    partition = f"run_date={now:%Y-%m-%d}/model={model}"
    for key in pending:
        entry = ledger["parts"].setdefault(key, {})
        entry.setdefault("target", fsio.join(lake, key.split("/")[0], partition,
                                             f"{run_id}-{key.split('/', 1)[1].removesuffix('.parquet')}.parquet"))
    _save_ledger(run_dir, lake, ledger)
    by_slot = {(r["group"], r["image_id"]): r for r in manifest.to_pylist() if r["group"] is not None}
    by_volume = {r["volume_id"]: r for r in manifest.to_pylist()
                 if r["group"] is not None and r["volume_id"] and r["slice"] == 0 and r["superseded_by"] is None}
    written: dict[str, int] = {}
    for key, part in pending.items():
        name = key.split("/")[0]
        if name == "manifest":
            batch = int(key.rsplit("-", 1)[1])
            rows = [r for r in manifest.to_pylist() if r["batch"] == batch]
            table = pa.Table.from_pylist([dict(r, run_id=run_id, store=store, published_at=now,
                                               source_path=public(r["source_path"]), mask_path=public(r["mask_path"]))
                                          for r in rows],
                                         schema=lake_schema("manifest"))
        else:
            part_table = pq.read_table(pa.BufferReader(fsio.read_bytes(part)))
            if name == "volumes":  # a volume's lineage: its file (the row of its first slice)
                found = [by_volume.get(v, {}) for v in part_table.column("volume_id").to_pylist()]
            else:
                keys = zip((unit_groups[u] for u in part_table.column("unit").to_pylist()),
                           part_table.column("image_id").to_pylist())
                found = [by_slot.get(k, {}) for k in keys]
            checkpoint = run_info.get("checkpoint")
            table = _lineage(part_table, found, run_id=run_id, store=store, published_at=now, name=name,
                             checkpoint=None if checkpoint is None else fsio.without_secrets(checkpoint))
        _write(ledger["parts"][key]["target"], table, name, run_info)
        ledger["parts"][key]["done"] = True
        written[name] = written.get(name, 0) + 1
    _save_ledger(run_dir, lake, ledger)
    return written


def read_lake(lake: str, table: str = "dice", *, filter: Any = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a lake table (partition columns ``run_date``, ``model`` included; ``columns``: only
    those); empty when absent.

    Raises:
        LakeError: a file of the table is not Parquet, does not fit :func:`lake_schema`, or holds
            rows (read here) without their lineage (``run_id``: a Parquet file that segflow did not
            publish, named when it lacks the column).
    """
    location = fsio.join(lake, table)
    read = None if columns is None else list(dict.fromkeys([*columns, "run_id"]))
    try:
        out = read_hive(location, lake_schema(table), PARTITIONS, filter=filter, columns=read)
    except pa.ArrowException as exc:
        raise LakeError(f"the lake's {table} table cannot be read ({exc}); move the file it names out of "
                        f"{location} (only segflow's parts belong there)") from exc
    if out.column("run_id").null_count:  # every part segflow publishes names its run
        strays = [f for f in fsio.list_files(location, suffix=".parquet") if "run_id" not in _columns(f)]
        named = f": {', '.join(strays[:3])}{' and more' if len(strays) > 3 else ''}" if strays else ""
        raise LakeError(f"the lake's {table} table holds rows that segflow did not publish (no run_id){named}; "
                        f"move the files they come from out of {location} (only segflow's parts belong there)")
    return out if columns is None else out.select(list(columns))


def _columns(location: str) -> list[str]:
    """Column names of the Parquet file ``location`` (its footer only)."""
    fs, inner = fsio.url_to_fs(location)
    with fs.open(inner, "rb") as f:
        return pq.read_schema(f).names


def publish_run(lake: str, *, run_dir: str) -> dict[str, int]:
    """:func:`publish` for a run directory: its ``run.json``, its recorded plan and the manifest of the
    store it segmented."""
    info = read_run_info(run_dir)
    return publish(lake, run_dir=run_dir, run_info=info, manifest=read_manifest(info["store"]),
                   unit_groups=read_plan(run_dir).part_groups())
