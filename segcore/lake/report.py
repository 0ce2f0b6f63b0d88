"""Per-model, per-class Dice over time, read from the data lake (see :mod:`segcore.lake.publish`).

The lake is read with pyarrow (any fsspec location) and aggregated with DuckDB SQL over the
Arrow table. Rows with ``status != 'ok'`` and classes absent from an image's ground truth
(``empty_gt``) do not enter the means. "Over time" groups rows by the day they were published
(``run_date``); the *current* view keeps the rows of current image versions (the rule of
:mod:`segcore.collection.versions`, judged per model on the manifest batches published with its
runs), and of a version scored by several runs the newest publication, so a file that changed
counts once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from segcore.collection.versions import current_version_sql
from segcore.lake.publish import read_lake

_OVER_TIME = """
select model, class_name, run_date, count(distinct image_id) as images,
       avg(dice) as mean_dice, median(dice) as median_dice
from dice where status = 'ok' and not empty_gt
group by model, class_name, run_date order by model, class_name, run_date
"""

#: Rows of the lake's Dice table (``dice``) less those of superseded image versions: the rule of
#: :mod:`segcore.collection.versions` over the lake's manifest (``manifest``), per model; a row
#: whose batch is not in the lake's manifest stays.
CURRENT_DICE_SQL = f"""
select d.* from dice as d anti join (
    select distinct model, image_id, batch from manifest as m
    where not {current_version_sql(row="m", versions="manifest", match=("model",))}
) as s on s.model = d.model and s.image_id = d.image_id and coalesce(s.batch, 0) = coalesce(d.ingest_batch, 0)
"""

#: Of an image version scored by several runs of a model, the newest publication.
_CURRENT = f"""
with latest as (
    select *, row_number() over (partition by model, image_id, class_id
                                 order by ingest_batch desc nulls last, published_at desc) as k
    from ({CURRENT_DICE_SQL})
)
select model, class_name, count(distinct image_id) filter (where not empty_gt) as images,
       avg(dice) filter (where not empty_gt) as mean_dice,
       median(dice) filter (where not empty_gt) as median_dice
from latest where k = 1 and status = 'ok' group by model, class_name order by model, class_name
"""


def dice_report(lake: str) -> dict[str, pa.Table]:
    """``{"over_time": ..., "current": ...}`` tables of Dice statistics of the lake's Dice dataset."""
    return _query(read_lake(lake, "dice"), read_lake(lake, "manifest"), over_time=_OVER_TIME, current=_CURRENT)


def current_dice(dice: pa.Table, manifest: pa.Table) -> pa.Table:
    """The rows of ``dice`` (the lake's Dice table) of current image versions, by
    :data:`CURRENT_DICE_SQL` over ``manifest`` (the lake's manifest table)."""
    return _query(dice, manifest, rows=CURRENT_DICE_SQL)["rows"]


def _query(dice: pa.Table, manifest: pa.Table, **queries: str) -> dict[str, pa.Table]:
    con = duckdb.connect()
    try:
        con.register("dice", dice)
        con.register("manifest", manifest)
        return {name: con.sql(sql).to_arrow_table() for name, sql in queries.items()}
    finally:
        con.close()


def render_text(report: dict[str, pa.Table]) -> str:
    """Plain-text tables of a :func:`dice_report`."""
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = []
    for title, key, cols in (("Dice over time (by day published)", "over_time",
                              ("model", "class_name", "run_date", "images", "mean_dice", "median_dice")),
                             ("Current Dice (newest version of each image)", "current",
                              ("model", "class_name", "images", "mean_dice", "median_dice"))):
        rows = report[key].to_pylist()
        lines.append(title)
        if not rows:
            lines.append("  (no rows)")
            continue
        cells = [list(cols)] + [[fmt(r[c]) for c in cols] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        for row in cells:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot_over_time(report: dict[str, pa.Table], out_dir: str | Path) -> list[Path]:
    """One PNG per model, ``dice-over-time-<model>.png``: mean Dice per class by day. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["over_time"].to_pylist()
    paths = []
    for model in sorted({r["model"] for r in rows}):
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        mine = [r for r in rows if r["model"] == model]
        for cls in sorted({r["class_name"] for r in mine}):
            pts = sorted((str(r["run_date"]), r["mean_dice"]) for r in mine if r["class_name"] == cls)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cls)
        ax.set(title=f"Mean Dice per class: {model}", xlabel="run date", ylabel="mean Dice", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.autofmt_xdate()
        fig.tight_layout()
        path = out_dir / f"dice-over-time-{model}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
