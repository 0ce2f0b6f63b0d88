"""The Prefect artifacts of a segment run, as operators see them in the UI.

Every segment run publishes, keyed by its run id (keys: lowercase letters, digits, dashes):

- ``dice-summary-<run>``: the summary (markdown, the same text as ``RUN_DIR/summary.md``);
- ``dice-table-<run>``: per-class Dice statistics (table);
- ``dice-histogram-<run>``: per-image Dice of each foreground class (PNG in markdown);
- ``worst-images-<run>``: image | ground truth | prediction thumbnails of the lowest-Dice images;
- ``worst-volumes-<run>``: the same for three slices of each of the lowest-Dice volumes (runs
  with volumes);
- ``segment-progress-<run>``: units finished (progress, updated while the units complete);
- one link per output location (run directory, masks, Dice dataset, summary).

Every training run publishes, keyed by its flow run name (:func:`publish_training_artifacts`):

- ``training-history-<run>``: loss, learning rate and validation Dice per class per epoch (table);
- ``training-curve-<run>``: the same as a PNG curve, with the best epoch's figures (markdown).

Figures are drawn by :mod:`segcore.figures`; this module only publishes them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping
from uuid import UUID

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)

from segcore import figures
from tasks.progress import report

GALLERY_IMAGES = 6
#: Volumes in the gallery of worst volumes (three slices each).
GALLERY_VOLUMES = 3
PROGRESS_UPDATES = 20


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(ch if ch.isalnum() and ch.isascii() else "-" for ch in text.lower()).strip("-")[:100] or "segflow"


def location_href(location: str) -> str:
    """A link target for an output location: URLs (``s3://b/run``) as they are, local paths as
    ``file://`` URIs of their absolute path."""
    return location if "://" in location else Path(location).absolute().as_uri()


class UnitProgress:
    """Units finished in one run: a progress artifact, sent at most ``max_updates`` times (plus the
    first and the last value) however many units there are, and a ``"segment"`` progress report
    (:func:`tasks.progress.report`) per finished unit, with the images done and their rate."""

    def __init__(self, run_id: str, *, total: int, done: int = 0, max_updates: int = PROGRESS_UPDATES) -> None:
        self.total, self.done, self.max_updates = max(total, 0), min(done, total), max_updates
        self.run_id = run_id
        self.images, self._t0, self._advanced = 0, time.perf_counter(), False
        self._sent_step = self._step()
        self._id: UUID = create_progress_artifact(progress=self.percent, key=artifact_key(f"segment-progress-{run_id}"),
                                                  description=self._description())
        report("segment", self.done, self.total, self._message())

    @property
    def percent(self) -> float:
        return 100.0 if self.total == 0 else round(100.0 * self.done / self.total, 1)

    def _step(self) -> int:
        return self.max_updates if self.total == 0 else self.done * self.max_updates // self.total

    def _description(self) -> str:
        return f"Units finished in run {self.run_id}: {self.done} of {self.total}"

    def _message(self) -> str:
        if not self._advanced:  # the first report: no rate yet (units done by an earlier run are not timed)
            return f"{self.done} done by an earlier run" if self.done else "starting"
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        rate = self.images / seconds
        if 0 < rate < 0.1:  # large images: seconds an image reads better than 0.0 images/s
            return f"{self.images} images, {seconds / self.images:.0f} s/image"
        return f"{self.images} images, {rate:.1f} images/s"

    def advance(self, n: int = 1, *, images: int = 0) -> None:
        """``n`` more units finished, holding ``images`` images; reports progress, and updates the
        artifact when another 1/``max_updates`` is done."""
        self.done = min(self.total, self.done + n)
        self.images += images
        self._advanced = True
        report("segment", self.done, self.total, self._message())
        if self._step() > self._sent_step:
            self._sent_step = self._step()
            update_progress_artifact(artifact_id=self._id, progress=self.percent, description=self._description())


def dice_table_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of the Dice table artifact: one per class, Dice rounded to 4 decimals."""
    def r4(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return [{"class": f"{c['class_id']} {c['class_name']}", "images": c["images"],
             "images with class": c["images_with_class"], "mean Dice": r4(c["mean_dice"]),
             "median Dice": r4(c["median_dice"]), "mean Dice (all rows)": r4(c["mean_dice_all_rows"])}
            for c in summary["per_class"]]


def foreground_dice_values(t: pa.Table) -> dict[str, list[float]]:
    """``"<id> <name>"`` of every foreground class -> its per-image Dice in Dice table ``t`` where the
    ground truth holds the class (the values the summary's means are taken over)."""
    t = t.filter(pc.and_(pc.and_(pc.equal(t["status"], "ok"), pc.invert(t["empty_gt"])),
                         pc.greater(t["class_id"], 0)))
    out: dict[str, list[float]] = {}
    for cid, name, dice in zip(t["class_id"].to_pylist(), t["class_name"].to_pylist(), t["dice"].to_pylist()):
        out.setdefault((cid, name), []).append(dice)
    return {f"{cid} {name}": v for (cid, name), v in sorted(out.items())}


def _histogram_markdown(values: dict[str, list[float]], run_id: str) -> str:
    lines = [f"# Dice per image, run {run_id}", ""]
    if not values:
        return "\n".join(lines + ["No image has ground truth for a foreground class, so there is no Dice to plot."]) + "\n"
    png = figures.dice_histogram_png(values)
    lines += [f"![Dice histogram of run {run_id}]({figures.png_data_uri(png)})", "",
              "| class | images | mean | median | min |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, v in values.items():
        a = np.asarray(v, dtype=float)
        lines.append(f"| {name} | {a.size} | {a.mean():.4f} | {np.median(a):.4f} | {a.min():.4f} |")
    return "\n".join(lines) + "\n"


def publish_run_artifacts(run: Any, summary: Mapping[str, Any], markdown: str, *, dice: pa.Table) -> None:
    """Publish the summary, Dice table, histogram, worst-image gallery and output links of a run.

    ``run`` is the run's :class:`segcore.run.results.RunReader`, ``summary`` the dict of
    :func:`segcore.metrics.summary.summarise_dice` (with ``run_id`` and ``outputs``), ``markdown`` its
    rendering, ``dice`` the Dice rows it summarises (current image versions only).
    """
    run_id = summary["run_id"]
    create_markdown_artifact(markdown=markdown, key=artifact_key(f"dice-summary-{run_id}"),
                             description=f"Dice summary of run {run_id}")
    create_table_artifact(table=dice_table_rows(summary), key=artifact_key(f"dice-table-{run_id}"),
                          description=f"Dice per class of run {run_id} (mean and median over images whose "
                                      "ground truth holds the class)")
    create_markdown_artifact(markdown=_histogram_markdown(foreground_dice_values(dice), run_id),
                             key=artifact_key(f"dice-histogram-{run_id}"),
                             description=f"Histogram of per-image Dice of run {run_id}")
    names = {c["class_id"]: c["class_name"] for c in summary["per_class"]}
    gallery = figures.gallery_markdown(run, summary["worst_images"], class_names=names, n=GALLERY_IMAGES)
    create_markdown_artifact(markdown=f"# Worst images of run {run_id}\n\n{gallery}",
                             key=artifact_key(f"worst-images-{run_id}"),
                             description=f"The {GALLERY_IMAGES} images of run {run_id} with the lowest mean "
                                         "foreground Dice")
    worst_volumes = summary.get("volumes", {}).get("worst_volumes", [])[:GALLERY_VOLUMES]
    if worst_volumes:
        picks = [{"image_id": i, "mean_foreground_dice": w["mean_foreground_dice"]}
                 for w in worst_volumes for i in w["preview_slices"]]
        gallery = figures.gallery_markdown(run, picks, class_names=names, n=len(picks))
        create_markdown_artifact(
            markdown=f"# Worst volumes of run {run_id}\n\nA few slices of each volume, with the volume's mean "
                     f"foreground 3-D Dice.\n\n{gallery}",
            key=artifact_key(f"worst-volumes-{run_id}"),
            description=f"The {len(worst_volumes)} volumes of run {run_id} with the lowest mean foreground 3-D Dice")
    for name, location in summary.get("outputs", {}).items():
        create_link_artifact(link=location_href(str(location)), link_text=f"{name}: {location}",
                             description=f"Where the {name} of run {run_id} is: {location}")


def training_table_rows(history: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per epoch: epoch, loss, lr, seconds and every validation figure (``val_dice``
    flattened to ``val_dice_<class>``)."""
    rows = []
    for r in history:
        row = {"epoch": r["epoch"], "loss": round(float(r["loss"]), 5), "lr": float(r["lr"]),
               "seconds": round(float(r["seconds"]), 2)}
        for key, value in r.items():
            if key == "val_dice" and isinstance(value, Mapping):
                row.update({f"val_dice_{name}": round(float(v), 5) for name, v in value.items()})
            elif key.startswith("val_") and isinstance(value, float):
                row[key] = round(value, 5)
        rows.append(row)
    return rows


def publish_training_artifacts(result: Mapping[str, Any], *, run_name: str) -> None:
    """Publish the epoch table and the training curve (with the best epoch's figures, or the note that
    nothing was held out and the last epoch was kept) of a training run; ``result`` is
    :class:`segcore.training.from_store.TrainResult` as a dict."""
    from segcore.training.from_store import no_validation_note  # torch: only where training ran

    history = result["history"]
    unvalidated = no_validation_note(result)
    create_table_artifact(table=training_table_rows(history), key=artifact_key(f"training-history-{run_name}"),
                          description=f"Loss{'' if unvalidated else ' and validation scores'} per epoch of training "
                                      f"run {run_name}")
    lines = [f"# Training run {run_name}", "", f"Checkpoint `{result['checkpoint']}`", ""]
    if history:
        png = figures.training_curve_png(history)
        lines += [f"![training curve of {run_name}]({figures.png_data_uri(png)})", ""]
    if unvalidated:
        lines.append(unvalidated[0].upper() + unvalidated[1:] + ".")
    elif result.get("best_epoch"):
        lines.append(f"Best epoch: **{result['best_epoch']}** of {len(history)}.")
    absent = set((result.get("best_val") or {}).get("val_absent") or ())
    for name, dice in ((result.get("best_val") or {}).get("val_dice") or {}).items():
        lines.append(f"- validation Dice {name}: {dice:.4f}"
                     + (" (absent from the validation images: not in the mean)" if name in absent else ""))
    if result.get("normalisation"):
        lines += ["", f"Normalisation: {result['normalisation']}"]
    refit = result.get("refit")
    if refit:
        lines += ["", f"Refit on all {refit['images']} images for {refit['epochs']} epochs: the checkpoint holds "
                      "that model; the figures above are those of the run with the validation split."
                  if refit["done"] else f"Refit not done ({refit['reason']}): the checkpoint holds the validated model."]
    create_markdown_artifact(markdown="\n".join(lines) + "\n", key=artifact_key(f"training-curve-{run_name}"),
                             description=f"Training curve of run {run_name}")
