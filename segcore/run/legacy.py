"""Run directories written before run plans and run keys (``run.json`` format 1).

Such a directory recorded the segment spec it was made with (``run.json``'s ``spec``) and one
JSON done marker per unit, but neither its plan nor a run key. :func:`legacy_plan` gives readers
(the reader, the lake, incremental runs) the plan it was made with; :func:`upgrade` turns it into a
current run directory when it is resumed with the same settings: it writes ``plan.json`` and the
key, and rewrites the old unit and block markers as done-records of that key, so that no finished
unit is computed again. (Instance models' block detections and finished tiled images are redone
once: the old directory did not record them.)
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from segcore import fsio
from segcore.collection.store import open_store
from segcore.run.context import BlockRecord, Counts, Timing, UnitRecord
from segcore.run.plan import RunPlan, plan_units

log = logging.getLogger(__name__)

#: The segment-spec fields that shaped a format-1 run's outputs.
SHAPING_SPEC_FIELDS = ("tile_size", "overlap", "blend", "tta", "precision")


def legacy_plan(info: Mapping[str, Any]) -> RunPlan:
    """The plan a format-1 run was made with: its store planned as its spec said (the tiling itself
    is not needed to read the results)."""
    tiled = (info.get("spec") or {}).get("tile_size") != 0
    return RunPlan(units=tuple(plan_units(open_store(info["store"]), tiled=tiled)))


def setting_differences(info: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
    """The output-shaping spec fields whose value now differs from the one a format-1 run recorded."""
    old = info.get("spec") or {}
    return [f"{k}: {old.get(k)!r} in the run directory, {spec.get(k)!r} now" for k in SHAPING_SPEC_FIELDS
            if old.get(k) != spec.get(k)]


def _timing(marker: Mapping[str, Any]) -> Timing:
    return Timing(device=str(marker.get("device", "")), pid=int(marker.get("pid", 0)),
                  started=float(marker.get("started", 0.0)), finished=float(marker.get("finished", 0.0)),
                  read_s=float(marker.get("read_s", 0.0)), predict_s=float(marker.get("predict_s", 0.0)),
                  total_s=float(marker.get("total_s", 0.0)))


def _record(marker: Mapping[str, Any], key: str) -> UnitRecord | BlockRecord:
    if marker.get("window") is None:
        return UnitRecord(unit=marker["unit"], group=marker["group"], start=marker["start"], stop=marker["stop"],
                          key=key, n_images=marker["n_images"], n_evaluated=marker.get("n_evaluated", 0),
                          n_errors=marker.get("n_errors", 0), dice_rows=marker.get("dice_rows", 0),
                          instances=marker.get("instances"), timing=_timing(marker))
    counts = marker.get("counts")
    return BlockRecord(unit=marker["unit"], group=marker["group"], index=marker["start"],
                       window=tuple(marker["window"]), key=key, tiles=marker.get("tiles", 0),
                       counts=None if counts is None else Counts(**{k: tuple(v) if isinstance(v, list) else v
                                                                    for k, v in counts.items()}),
                       timing=_timing(marker), objects=marker.get("objects", []), detected=marker.get("detected", 0),
                       on_seams=marker.get("on_seams", 0), duplicates_dropped=marker.get("duplicates_dropped", 0),
                       cut_risk=marker.get("cut_risk", 0), capped=marker.get("capped", 0))


def upgrade(run_dir: str, info: dict[str, Any], *, key: str, shaping: Mapping[str, Any], plan: RunPlan,
            format_version: int) -> dict[str, Any]:
    """Rewrite a format-1 run directory as a current one (see the module docstring); returns its new info.
    The caller has checked that the run is resumed with the settings it was made with."""
    found = fsio.list_files(fsio.join(run_dir, "units"), suffix=".json", recursive=False)
    converted = 0
    for loc, data in zip(found, fsio.read_many(found)):
        marker = json.loads(data)
        if isinstance(marker, dict) and "type" not in marker and "unit" in marker:
            fsio.write_json(loc, _record(marker, key).to_json())
            converted += 1
    fsio.write_json(fsio.join(run_dir, "plan.json"), plan.to_json())
    info = {**info, "format": format_version, "key": key, "shaping": dict(shaping)}
    fsio.write_json(fsio.join(run_dir, "run.json"), info)
    log.warning("upgraded run directory %s (run %s) to format %d: %d done marker(s) kept", run_dir,
                info.get("run_id"), format_version, converted)
    return info
