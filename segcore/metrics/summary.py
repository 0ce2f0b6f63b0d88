"""Run summaries: per-class Dice statistics, the worst images, error counts, output locations."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

#: How the one evaluation policy (:mod:`segcore.run.evaluate`) begins the error of an image whose
#: ground truth holds a label the model does not have.
GT_LABEL_ERROR = "ground truth has label "


def summarise_dice(dice: pa.Table, *, manifest: pa.Table | None = None, worst: int = 10) -> dict[str, Any]:
    """Summary dict of a Dice table (see :data:`segcore.run.tables.DICE_COLUMNS`).

    Per class: mean/median Dice over images where the class is in the ground truth (non-empty GT)
    and over all rows. Worst images by mean foreground Dice over the classes each image's ground truth
    or prediction holds (a class absent from both is left out). Error counts from Dice rows and, when
    given, from the store manifest (unreadable files and unusable masks). ``gt_label_errors``
    counts the images whose ground truth holds a label outside the model's classes (error rows
    too, already in ``error_images``).
    """
    rows = dice.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    classes: dict[int, dict[str, Any]] = {}
    for r in ok:
        c = classes.setdefault(r["class_id"], {"class_id": r["class_id"], "class_name": r["class_name"],
                                                "all": [], "present": []})
        c["all"].append(r["dice"])
        if not r["empty_gt"]:
            c["present"].append(r["dice"])
    per_class = []
    for cid in sorted(classes):
        c = classes[cid]
        present = np.asarray(c["present"], dtype=float)
        per_class.append({
            "class_id": cid,
            "class_name": c["class_name"],
            "images": len(c["all"]),
            "images_with_class": int(present.size),
            "mean_dice": float(np.mean(present)) if present.size else None,
            "median_dice": float(np.median(present)) if present.size else None,
            "mean_dice_all_rows": float(np.mean(c["all"])) if c["all"] else None,
        })
    # An image's mean foreground Dice: over the classes in its ground truth or its prediction. A class
    # absent from both scores 1 by convention and would lift the mean of an image that is missing
    # classes; a class predicted but absent from the truth scores 0 and counts.
    per_image: dict[str, list[float]] = {}
    for r in ok:
        if r["class_id"] != 0 and not (r["empty_gt"] and r["tp"] + r["fp"] == 0):
            per_image.setdefault(r["image_id"], []).append(r["dice"])
    worst_images = sorted(((float(np.mean(v)), k) for k, v in per_image.items()))[:worst]
    fg = [c["mean_dice"] for c in per_class if c["class_id"] != 0 and c["mean_dice"] is not None]
    summary: dict[str, Any] = {
        "images_evaluated": len({r["image_id"] for r in ok}),
        "dice_rows": len(rows),
        "error_images": len({r["image_id"] for r in rows if r["status"] != "ok"}),
        "gt_label_errors": len({r["image_id"] for r in rows
                                if r["status"] != "ok" and (r["error"] or "").startswith(GT_LABEL_ERROR)}),
        "mean_foreground_dice": float(np.mean(fg)) if fg else None,
        "per_class": per_class,
        "worst_images": [{"image_id": k, "mean_foreground_dice": v} for v, k in worst_images],
    }
    if manifest is not None:
        m = manifest.to_pylist()
        summary["images_ingested"] = sum(1 for r in m if r["status"] == "ok")
        unreadable: dict[str, dict[str, Any]] = {}  # by file: a volume's slices share theirs
        for r in m:
            if r["status"] != "ok":
                unreadable.setdefault(r["source_path"], {"source_path": r["source_path"], "error": r["error"]})
        summary["unreadable_files"] = list(unreadable.values())
        summary["masks_missing"] = sum(1 for r in m if r["status"] == "ok" and r["mask_status"] == "missing")
        summary["masks_unusable"] = sum(1 for r in m if r["mask_status"] == "error")
    return summary


def summarise_instances(metrics: pa.Table, instances: pa.Table) -> dict[str, Any]:
    """Instance-level summary: predicted instances, and means of per-image F1, AP, PQ when evaluated."""
    from segcore.metrics.instance import detection_ratios  # scipy: only where instances are summarised

    out: dict[str, Any] = {"instances_predicted": instances.num_rows}
    if metrics.num_rows:
        rows = metrics.to_pylist()
        # precision and recall from each row's counts: rows written before the empty-case rule changed
        # (segcore.metrics.instance) count as today's
        ratios = [detection_ratios(r["tp"], r["fp"], r["fn"]) for r in rows]
        for key in ("f1", "precision", "recall", "ap", "ap50", "panoptic_quality", "mean_matched_iou"):
            column = ([p for p, _, _ in ratios] if key == "precision" else [r for _, r, _ in ratios]
                      if key == "recall" else [row[key] for row in rows])
            values = np.asarray([v for v in column if v is not None], dtype=float)
            values = values[~np.isnan(values)]
            out[f"mean_{key}"] = float(values.mean()) if values.size else None
        for key in ("tp", "fp", "fn"):
            out[f"total_{key}"] = int(np.sum(metrics.column(key).to_numpy()))
        out["pooled_f1"] = detection_ratios(out["total_tp"], out["total_fp"], out["total_fn"])[2]
    return out


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def preview_slices(slices: Sequence[str], k: int = 3) -> list[str]:
    """``k`` slices spread over a volume (at 1/4, 2/4, 3/4 of its depth for ``k=3``), in order."""
    n = len(slices)
    return [slices[i] for i in sorted({min(n - 1, (j + 1) * n // (k + 1)) for j in range(k)})] if n else []


#: What HD95 and ASSD are measured in when the spacing has no unit and is not 1 voxel.
UNKNOWN_UNIT = "spacing units (unit unknown)"


def distance_unit(unit: str | None, spacing: Sequence[float | None]) -> str:
    """What a volume's HD95 and ASSD are in: its spacing's ``unit``; without one, ``voxel`` when the
    spacing is 1 along every axis, else :data:`UNKNOWN_UNIT` (a NIfTI header without units: the
    distances are in its spacing, whatever unit that was)."""
    if unit:
        return unit
    return "voxel" if all(v is None or float(v) == 1.0 for v in spacing) else UNKNOWN_UNIT


def summarise_volumes(volumes: pa.Table, *, worst: int = 10,
                      slices: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Summary of a volume table (see :data:`segcore.run.volumes.VOLUME_SCHEMA`): per foreground
    class and distance unit (volumes of other units are not averaged together), the mean 3-D Dice
    over volumes whose ground truth has the class, and the mean HD95 and ASSD over volumes where
    both masks have it (in ``unit``: the distance units of the volumes scored,
    None when none was); the worst volumes by mean
    foreground Dice, each with a few of its ``slices`` (volume id -> its slices' image ids) to show;
    the volumes that could not be scored."""
    rows = volumes.to_pylist()
    ok = [r for r in rows if r["status"] == "ok" and r["class_id"] != 0]

    def unit_of(r: Mapping[str, Any]) -> str:
        return distance_unit(r["spacing_unit"], (r["spacing_z"], r["spacing_y"], r["spacing_x"]))

    per_class = []
    for cid, unit in sorted({(r["class_id"], unit_of(r)) for r in ok}):  # distances of one unit averaged together
        these = [r for r in ok if r["class_id"] == cid and unit_of(r) == unit]
        present = [r for r in these if not r["empty_gt"]]
        surface = [r for r in these if r["surface_status"] == "ok"]
        per_class.append({"class_id": cid, "class_name": these[0]["class_name"], "unit": unit,
                          "volumes_with_class": len(present), "mean_dice": _mean([r["dice"] for r in present]),
                          "mean_hd95": _mean([r["hd95"] for r in surface]),
                          "mean_assd": _mean([r["assd"] for r in surface])})
    by_volume: dict[str, list[float]] = {}
    for r in ok:
        by_volume.setdefault(r["volume_id"], []).append(r["dice"])
    ranked = sorted((float(np.mean(v)), k) for k, v in by_volume.items())[:worst]
    units = sorted({unit_of(r) for r in rows if r["status"] == "ok"})
    return {"volumes_evaluated": len(by_volume), "unit": ", ".join(units) or None, "per_class": per_class,
            "worst_volumes": [{"volume_id": k, "mean_foreground_dice": v,
                               "preview_slices": preview_slices((slices or {}).get(k, ()))} for v, k in ranked],
            "errors": [{"volume_id": r["volume_id"], "error": r["error"]} for r in rows if r["status"] != "ok"]}


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def render_markdown(summary: dict[str, Any], *, title: str = "segflow run") -> str:
    """Markdown rendering of :func:`summarise_dice`'s output plus ``summary['outputs']`` if present."""
    lines = [f"# {title}", ""]
    if summary.get("run_id"):
        lines += [f"Run `{summary['run_id']}` · model `{summary.get('model', '?')}`", ""]
    if summary.get("units_failed"):  # the figures below leave those units' images out
        lines += [f"**{summary['units_failed']} of {summary.get('units', '?')} work unit(s) failed**: their images "
                  "are neither segmented nor counted below; the reasons are in the run directory's `failed/`; run "
                  "the same command again to redo only those.", ""]
    if summary.get("images_at_detection_cap"):
        lines += [f"**{summary['images_at_detection_cap']} image(s) reached the model's cap on detections**: objects "
                  "beyond it are missing (raise the model's `box_detections_per_img`).", ""]
    lines += [
        f"- images in the store: {summary.get('images_ingested', '–')}",
        f"- images evaluated (with ground truth): {summary['images_evaluated']}",
        f"- mean foreground Dice: **{_fmt(summary['mean_foreground_dice'])}**",
        f"- images with errors: {summary['error_images']}; unreadable files: "
        f"{len(summary.get('unreadable_files', []))}; masks missing: {summary.get('masks_missing', '–')}; "
        f"masks unusable: {summary.get('masks_unusable', '–')}; ground truth with labels the model lacks: "
        f"{summary.get('gt_label_errors', '–')}",
        "",
        "| class | images with class | mean Dice | median Dice |",
        "| --- | ---: | ---: | ---: |",
    ]
    for c in summary["per_class"]:
        lines.append(f"| {c['class_id']} {c['class_name']} | {c['images_with_class']} | {_fmt(c['mean_dice'])} "
                     f"| {_fmt(c['median_dice'])} |")
    inst = summary.get("instance")
    if inst:
        lines += ["", f"Instances predicted: {inst['instances_predicted']}"]
        if "mean_f1" in inst:
            lines += [
                f"Instance metrics at IoU 0.5 (mean over images): F1 {_fmt(inst['mean_f1'])}, precision "
                f"{_fmt(inst['mean_precision'])}, recall {_fmt(inst['mean_recall'])}, PQ "
                f"{_fmt(inst['mean_panoptic_quality'])}; AP@[.5:.95] {_fmt(inst['mean_ap'])}; pooled F1 "
                f"{_fmt(inst['pooled_f1'])} (TP {inst['total_tp']}, FP {inst['total_fp']}, FN {inst['total_fn']})",
            ]
    vol = summary.get("volumes")
    if vol:
        distances = f"; distances in {vol['unit']}" if vol["unit"] else ""  # none without a volume scored
        lines += ["", f"Volumes evaluated: {vol['volumes_evaluated']} (3-D metrics{distances})", "",
                  "| class | volumes with class | mean 3-D Dice | mean HD95 | mean ASSD |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        several = len({c.get("unit") for c in vol["per_class"]}) > 1  # one row per class and unit: say which

        def label(c: Mapping[str, Any]) -> str:
            return f"{c['class_id']} {c['class_name']}" + (f" ({c.get('unit')})" if several else "")

        lines += [f"| {label(c)} | {c['volumes_with_class']} | {_fmt(c['mean_dice'])} | {_fmt(c['mean_hd95'])} | "
                  f"{_fmt(c['mean_assd'])} |" for c in vol["per_class"]]
        lines += ["", "Worst volumes (mean foreground 3-D Dice):", "", "| volume | Dice |", "| --- | ---: |"]
        lines += [f"| {w['volume_id']} | {_fmt(w['mean_foreground_dice'])} |" for w in vol["worst_volumes"]]
        lines += [f"- volume `{e['volume_id']}` not scored: {e['error']}" for e in vol["errors"][:20]]
    lines += ["", "Worst images (mean foreground Dice):", "", "| image | Dice |", "| --- | ---: |"]
    lines += [f"| {w['image_id']} | {_fmt(w['mean_foreground_dice'])} |" for w in summary["worst_images"]]
    bad = summary.get("unreadable_files", [])
    if bad:
        lines += ["", "Unreadable files:", ""] + [f"- `{b['source_path']}`: {b['error']}" for b in bad[:20]]
        if len(bad) > 20:
            lines.append(f"- ... and {len(bad) - 20} more (the manifest's rows with status `error`)")
    if summary.get("outputs"):
        lines += ["", "Outputs:", ""] + [f"- {k}: `{v}`" for k, v in summary["outputs"].items()]
    return "\n".join(lines) + "\n"
