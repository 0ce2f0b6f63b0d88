"""Per-model reports read from the data lake (see :mod:`segcore.lake.publish`): Dice over time,
3-D metrics of volumes and instance metrics.

A *model* is one checkpoint. Every row of a run table in the lake carries its architecture
(``model``, a partition) and its checkpoint's ``checkpoint_sha256``; the report names a model
``arch@`` + the first 12 hex digits of that hash (:data:`MODEL_ID_SQL`, the 12 digits that also name
the run directories of incremental runs), so two checkpoints of one architecture are two models.
A row without a checkpoint hash counts under its architecture alone. A manifest row belongs to
the model of the run that published it (its ``run_id``, looked up in the run tables). Image and
volume ids name an image within its store only: rows are told apart by their ``store`` too (the
store the run segmented, recorded at publication), so two collections that both hold an
``img-00000`` or a ``case1`` are counted apart; rows published before the lake recorded stores
count as one store.

The lake is read with pyarrow (any fsspec location) and aggregated with DuckDB SQL over the
Arrow tables. The sections of :func:`lake_report`:

- ``models``: each model with its architecture, the file names its runs gave it (the checkpoints
  or model records of that hash; none for rows published before the lake recorded them), full
  checkpoint hash, runs, first and last day published and the lake tables that hold its rows.
- Dice (``over_time``, ``current``) per model and class: rows with ``status != 'ok'`` and classes
  absent from an image's ground truth (``empty_gt``) do not enter the means. "Over time" groups
  rows by the day they were published (``run_date``); the *current* view keeps the rows of current
  image versions (the rule of :mod:`segcore.collection.versions`, judged per model on the
  manifest batches published with its runs), and of a version scored by several runs of the model
  the newest publication, so a file that changed counts once.
- ``volumes``: per model, foreground class and distance unit (the spacing's unit; ``voxel`` for a
  spacing of 1 without one, ``spacing units (unit unknown)`` for another spacing without one), the
  means over the model's volumes
  as last scored (the rows of a volume's latest ``published_at``) of 3-D Dice (volumes whose ground
  truth has the class), HD95 and ASSD (volumes where both masks have the class), as the run summary
  computes them (:func:`segcore.metrics.summary.summarise_volumes`).
- Instance metrics (``instances_over_time``, ``instances``) per model: means over images of the
  per-image figures (counts, F1, precision, recall and panoptic quality at IoU 0.5, AP over IoU
  0.50:0.95), NaN values (AP without ground truth) left out, and the pooled F1 of the summed counts,
  as :func:`segcore.metrics.summary.summarise_instances`; the current view by the same version rule
  as Dice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from segcore import fsio
from segcore.collection.versions import current_version_sql
from segcore.errors import LakeError, NotFound
from segcore.lake.publish import LAKE_TABLES, PARTITIONS, PUBLIC_STORE_SQL, lake_schema, read_lake
from segcore.metrics.summary import UNKNOWN_UNIT

#: A lake row's model (row alias ``{t}``): ``arch@<first 12 hex digits of checkpoint_sha256>``, or the
#: architecture alone for a row without a checkpoint hash.
MODEL_ID_SQL = "coalesce({t}.model || '@' || left({t}.checkpoint_sha256, 12), {t}.model)"

#: Lake tables whose rows name their model, and the columns of each that the report reads.
_MODEL_TABLES = ("dice", "volumes", "instance_metrics", "instances")
_RUN_COLUMNS = ("run_date", "model", "run_id", "checkpoint_sha256", "checkpoint")


def current_rows_sql(table: str) -> str:
    """Rows of the lake table ``table`` (per image: ``image_id``, ``ingest_batch``, ``model_id``,
    ``store_key``) less those of superseded image versions: the rule of
    :mod:`segcore.collection.versions` over the lake's manifest (``manifest``), per model and store
    (image ids are unique within a store only); a row whose batch is not in the lake's manifest stays."""
    return f"""
select t.* from {table} as t anti join (
    select distinct model_id, store_key, image_id, batch from manifest as m
    where not {current_version_sql(row="m", versions="manifest", match=("model_id", "store_key"))}
) as s on s.model_id = t.model_id and s.store_key = t.store_key and s.image_id = t.image_id
      and coalesce(s.batch, 0) = coalesce(t.ingest_batch, 0)
"""


#: Rows of the lake's Dice table (``dice``) of current image versions (:func:`current_rows_sql`).
CURRENT_DICE_SQL = current_rows_sql("dice")


def _newest(table: str, key: str) -> str:
    """Of an image version of a store scored by several runs of a model, the newest publication."""
    return f"""select * from ({current_rows_sql(table)}) qualify row_number() over (
    partition by model_id, store_key, {key} order by ingest_batch desc nulls last, published_at desc) = 1"""


_MODELS = """
select model_id as model, any_value(model) as arch, list(distinct checkpoint_file order by checkpoint_file)
           filter (where checkpoint_file is not null) as checkpoint_files,
       any_value(checkpoint_sha256) as checkpoint_sha256, count(distinct run_id) as runs,
       min(run_date) as first_published, max(run_date) as last_published,
       list(distinct lake_table order by lake_table) as tables
from (select *, regexp_extract(rtrim(checkpoint, '/'), '[^/]*$') as checkpoint_file from runs)
group by model_id order by model_id
"""

_OVER_TIME = """
select model_id as model, class_name, run_date, count(distinct [store_key, image_id]) as images,
       avg(dice) as mean_dice, median(dice) as median_dice
from dice where status = 'ok' and not empty_gt
group by model_id, class_name, run_date order by model_id, class_name, run_date
"""

_CURRENT = f"""
select model_id as model, class_name, count(distinct [store_key, image_id]) filter (where not empty_gt) as images,
       avg(dice) filter (where not empty_gt) as mean_dice,
       median(dice) filter (where not empty_gt) as median_dice
from ({_newest("dice", "image_id, class_id")}) where status = 'ok'
group by model_id, class_name order by model_id, class_name
"""

#: What a volume row's HD95 and ASSD are in (:func:`segcore.metrics.summary.distance_unit`).
DISTANCE_UNIT_SQL = (f"case when coalesce(spacing_unit, '') <> '' then spacing_unit "
                     f"when coalesce(spacing_z, 1) = 1 and coalesce(spacing_y, 1) = 1 and coalesce(spacing_x, 1) = 1 "
                     f"then 'voxel' else '{UNKNOWN_UNIT}' end")

_VOLUMES = f"""
with latest as (
    select * from volumes
    qualify rank() over (partition by model_id, store_key, volume_id order by published_at desc) = 1
)
select model_id as model, class_name, {DISTANCE_UNIT_SQL} as unit,
       count(distinct [store_key, volume_id]) filter (where not empty_gt) as volumes,
       avg(dice) filter (where not empty_gt) as mean_dice,
       avg(hd95) filter (where surface_status = 'ok' and isfinite(hd95)) as mean_hd95,
       avg(assd) filter (where surface_status = 'ok' and isfinite(assd)) as mean_assd
from latest where status = 'ok' and class_id <> 0
group by model_id, class_name, unit order by model_id, class_name, unit
"""

#: Per-image instance figures averaged over images (NaN left out), and the pooled F1.
_INSTANCE_MEANS = ("f1", "precision", "recall", "panoptic_quality", "ap", "ap50", "ap75", "mean_matched_iou")
_POOLED_F1 = ("case when sum(tp) + sum(fp) + sum(fn) = 0 then 1.0 "
              "else 2.0 * sum(tp) / (2 * sum(tp) + sum(fp) + sum(fn)) end as pooled_f1")


#: Precision and recall of a row from its counts (segcore.metrics.instance.detection_ratios), so that rows
#: published before the empty-case rule changed count as today's.
_RATIO_SQL = {"precision": "case when tp + fp + fn = 0 then 1.0 when tp + fp = 0 then 0.0 else tp / (tp + fp) end",
              "recall": "case when tp + fp + fn = 0 then 1.0 when tp + fn = 0 then 0.0 else tp / (tp + fn) end"}


def _instance_sql(source: str, *, by: str) -> str:
    def mean(c: str) -> str:
        value = _RATIO_SQL.get(c, c)
        return f"avg({value}) filter (where not isnan({value})) as {c if c.startswith('mean_') else 'mean_' + c}"

    means = ", ".join(mean(c) for c in _INSTANCE_MEANS)
    return f"""
select model_id as model, {by + ", " if by else ""}count(distinct [store_key, image_id]) as images, {means},
       sum(tp)::bigint as tp, sum(fp)::bigint as fp, sum(fn)::bigint as fn, {_POOLED_F1}
from ({source}) group by model_id{", " + by if by else ""} order by model_id{", " + by if by else ""}
"""


_QUERIES = {
    "models": _MODELS,
    "over_time": _OVER_TIME,
    "current": _CURRENT,
    "volumes": _VOLUMES,
    "instances_over_time": _instance_sql("select * from instance_metrics", by="run_date"),
    "instances": _instance_sql(_newest("instance_metrics", "image_id"), by=""),
}


def lake_report(lake: str) -> dict[str, pa.Table]:
    """The report's tables of the lake at ``lake`` (a path or URL), by section (see the module
    docstring): ``models``, ``over_time``, ``current``, ``volumes``, ``instances_over_time``,
    ``instances``; a section is empty when the lake has no rows of its table.

    Raises:
        NotFound: nothing is at ``lake``, or it holds no lake rows.
        LakeError: ``lake`` is a run directory, or a file of a lake table cannot be read.
    """
    if not fsio.exists(lake):
        raise NotFound("no such location (runs publish there with 'segflow segment/run --lake')")
    if fsio.exists(fsio.join(lake, "run.json")):
        raise LakeError("this is a run directory, not a data lake; publish it to a lake with "
                        "'segflow segment/run --lake LAKE' and report on LAKE")
    tables = {name: read_lake(lake, name, columns=_RUN_COLUMNS if name == "instances" else None)
              for name in LAKE_TABLES}
    if not any(t.num_rows for t in tables.values()):
        raise NotFound(f"no lake rows here ({', '.join(f'{t}/' for t in LAKE_TABLES)} are missing or empty); "
                       "runs publish there with 'segflow segment/run --lake'")
    return _query(tables, **_QUERIES)


def current_dice(dice: pa.Table, manifest: pa.Table) -> pa.Table:
    """The rows of ``dice`` (the lake's Dice table) of current image versions, by
    :data:`CURRENT_DICE_SQL` over ``manifest`` (the lake's manifest table), with their ``model_id``."""
    return _query({"dice": dice, "manifest": manifest}, rows=CURRENT_DICE_SQL)["rows"]


def _query(tables: dict[str, pa.Table], **queries: str) -> dict[str, pa.Table]:
    """Run ``queries`` over the lake ``tables`` (by name; a missing one is empty), seen through views
    that add ``model_id`` (:data:`MODEL_ID_SQL`) and ``store_key`` (the row's store without
    credentials, query or fragment, :data:`~segcore.lake.publish.PUBLIC_STORE_SQL`; ``''`` in parts
    published before the lake recorded it) to every row, and ``runs``: the distinct ``run_id``,
    ``run_date``, ``model``, ``checkpoint_sha256``, ``checkpoint``, ``model_id`` and ``lake_table`` of
    the run tables."""
    con = duckdb.connect()
    try:
        for name in LAKE_TABLES:
            table = tables.get(name)
            if table is None:
                table = pa.schema(list(PARTITIONS) + list(lake_schema(name))).empty_table()
            else:  # tables built before the lake recorded stores or checkpoints
                for column in ("store", "checkpoint"):
                    if column in lake_schema(name).names and column not in table.column_names:
                        table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
            con.register(f"lake_{name}", table)
        for name in _MODEL_TABLES:
            con.execute(f"create view {name} as select *, {MODEL_ID_SQL.format(t=f'lake_{name}')} as model_id, "
                        f"{PUBLIC_STORE_SQL.format(t=f'lake_{name}')} as store_key from lake_{name}")
        con.execute("create view runs as " + " union ".join(
            f"select distinct {', '.join(_RUN_COLUMNS)}, model_id, '{name}' as lake_table from {name}"
            for name in _MODEL_TABLES))
        con.execute(f"""create view manifest as select m.*, coalesce(r.model_id, m.model) as model_id,
                              {PUBLIC_STORE_SQL.format(t="m")} as store_key
                       from lake_manifest as m left join (select distinct run_id, model_id from runs) as r
                       on r.run_id = m.run_id""")
        return {name: con.sql(sql).to_arrow_table() for name, sql in queries.items()}
    finally:
        con.close()


#: The sections of the text report: title, report key, columns shown, what to say when it has no rows.
_SECTIONS = (
    ("Models (arch@first 12 hex digits of the checkpoint's sha256)", "models",
     ("model", "arch", "checkpoint_files", "checkpoint_sha256", "runs", "first_published", "last_published",
      "tables"),
     "runs publish their tables here with 'segflow segment/run --lake'"),
    ("Dice over time (by day published)", "over_time",
     ("model", "class_name", "run_date", "images", "mean_dice", "median_dice"),
     "runs publish Dice rows for images with ground truth"),
    ("Current Dice (newest version of each image)", "current",
     ("model", "class_name", "images", "mean_dice", "median_dice"),
     "runs publish Dice rows for images with ground truth"),
    ("Volumes: 3-D metrics per foreground class (latest scoring of each volume; HD95, ASSD in unit)", "volumes",
     ("model", "class_name", "unit", "volumes", "mean_dice", "mean_hd95", "mean_assd"),
     "runs publish volume rows when they score volumes with ground truth: ingested 3-D files, or 2-D images "
     "grouped by --volume-pattern"),
    ("Instance metrics over time (by day published; F1 at IoU 0.5, AP over IoU 0.50:0.95)", "instances_over_time",
     ("model", "run_date", "images", "mean_f1", "mean_ap", "pooled_f1"),
     "runs of instance models publish them for images with instance ground truth"),
    ("Current instance metrics (newest version of each image; at IoU 0.5, AP over IoU 0.50:0.95)", "instances",
     ("model", "images", "mean_f1", "mean_precision", "mean_recall", "mean_panoptic_quality", "mean_ap",
      "mean_ap50", "mean_ap75", "mean_matched_iou", "tp", "fp", "fn", "pooled_f1"),
     "runs of instance models publish them for images with instance ground truth"),
)


def render_text(report: dict[str, pa.Table]) -> str:
    """Plain-text tables of a :func:`lake_report`, one per section; an empty section says why."""
    def fmt(v: Any) -> str:
        if isinstance(v, list):
            return ", ".join(map(str, v))
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = []
    for title, key, cols, absent in _SECTIONS:
        rows = report[key].to_pylist() if key in report else []
        lines.append(title)
        if not rows:
            lines += [f"  (no rows: {absent})", ""]
            continue
        cells = [list(cols)] + [[fmt(r[c]) for c in cols] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        for row in cells:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot_over_time(report: dict[str, pa.Table], out_dir: str | Path) -> list[Path]:
    """PNGs of a :func:`lake_report`, per model (``@`` in its name written as ``-``):
    ``dice-over-time-<model>.png``, mean Dice per class by day, and for a model with instance
    metrics ``instances-over-time-<model>.png``, mean F1, mean AP and pooled F1 by day. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []  # (file name, title, y label, {line label: [(day, value)]})
    dice = report["over_time"].to_pylist()
    for model in sorted({r["model"] for r in dice}):
        mine = [r for r in dice if r["model"] == model]
        series = {cls: [(r["run_date"], r["mean_dice"]) for r in mine if r["class_name"] == cls]
                  for cls in sorted({r["class_name"] for r in mine})}
        figures.append((f"dice-over-time-{model}", f"Mean Dice per class: {model}", "mean Dice", series))
    instances = report["instances_over_time"].to_pylist() if "instances_over_time" in report else []
    for model in sorted({r["model"] for r in instances}):
        mine = [r for r in instances if r["model"] == model]
        series = {label: [(r["run_date"], r[col]) for r in mine]
                  for label, col in (("mean F1 (IoU 0.5)", "mean_f1"), ("mean AP (IoU 0.50:0.95)", "mean_ap"),
                                     ("pooled F1 (IoU 0.5)", "pooled_f1"))}
        figures.append((f"instances-over-time-{model}", f"Instance metrics: {model}", "score", series))
    paths = []
    for name, title, ylabel, series in figures:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for label, points in series.items():
            pts = sorted((str(day), value) for day, value in points if value is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(title=title, xlabel="run date", ylabel=ylabel, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.autofmt_xdate()
        fig.tight_layout()
        path = out_dir / f"{name.replace('@', '-')}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
