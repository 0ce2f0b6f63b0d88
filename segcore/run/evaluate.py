"""The one evaluation policy: (prediction, ground truth, manifest status) -> Dice and error rows.

Whole-image units and tiled images both go through here, so an image is judged the same way
whichever path segmented it:

- an image that could not be decoded is an error row (one per class), whatever its prediction;
- an image whose mask is unusable (``mask_status="error"``) is an error row naming the reason;
- an image whose channels cannot be adapted to the model's (:mod:`segcore.run.channels`) is an
  error row naming both channel counts;
- an image without a mask is segmented but not scored (no row);
- ground truth with a label the model does not have is an error row naming the label;
- otherwise one row per class with its TP/FP/FN and Dice = 2TP / (2TP + FP + FN). An absent class
  scores 1.0 when the prediction is empty too, else 0.0 (``empty_gt`` marks both cases). Its
  ``channels_adapted`` says how its channels were fed to the model (``""``: as they are).

:func:`count_against_gt` turns predictions into :class:`~segcore.run.context.Counts`; a tiled
image sums its blocks' counts with :func:`sum_counts`; :func:`dice_rows` makes the table.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from segcore.metrics.dice import confusion_counts, counts_from_matrices, dice_from_counts
from segcore.models.checkpoint import ModelMeta
from segcore.run.channels import ChannelError, channel_note
from segcore.run.context import Counts
from segcore.run.tables import dice_table


def ground_truth_state(row: Mapping[str, Any]) -> tuple[bool, str | None]:
    """``(has usable ground truth, error message or None)`` of one manifest row."""
    if row["status"] != "ok":
        return False, row.get("error") or "image could not be decoded"
    if row["mask_status"] == "ok":
        return True, None
    if row["mask_status"] == "error":
        return False, f"ground truth unusable: {row.get('mask_error')}"
    return False, None


def channel_state(row: Mapping[str, Any], *, model_channels: int) -> tuple[str, str | None]:
    """``(channels_adapted note, error message or None)`` of one decodable image's manifest row fed
    to a ``model_channels`` model (:func:`segcore.run.channels.channel_note`); ``("", None)`` for
    rows without a channel count."""
    if row.get("channels") is None:
        return "", None
    try:
        return channel_note(int(row["channels"]), model_channels=model_channels), None
    except ChannelError as exc:
        return "", str(exc)


def gt_as_classes(gt: np.ndarray, *, mask_kind: str) -> np.ndarray:
    """Ground truth as int64 class labels: instance ids become foreground (1), class maps stay."""
    if mask_kind == "instance":
        return (gt > 0).astype(np.int64)
    return gt.astype(np.int64, copy=False)


def checked_gt(gt: np.ndarray, *, mask_kind: str, meta: ModelMeta) -> tuple[np.ndarray, dict[int, str]]:
    """Raw ``(N, H, W)`` ground truth (class ids, or instance ids when ``mask_kind="instance"``) as
    class labels, and, by index, the images that must not be scored: ground truth with a label the
    model lacks, or a negative one. The labels are the array itself when it holds unsigned class ids
    (no copy), uint8 foreground for instance ids, int64 otherwise (:func:`gt_as_classes`)."""
    c = meta.num_classes
    gt = np.asarray(gt)
    if mask_kind == "instance":
        classes = (gt > 0).astype(np.uint8)
    else:
        classes = gt if gt.dtype.kind == "u" else gt_as_classes(gt, mask_kind=mask_kind)
    errors: dict[int, str] = {}
    for i, g in enumerate(classes):
        top = int(g.max(initial=0))
        if classes.dtype.kind == "i" and int(g.min(initial=0)) < 0:
            errors[i] = f"ground truth has a negative label ({int(g.min())}); class labels start at 0"
        elif top >= c:
            errors[i] = (f"ground truth has label {top} but the model has {c} classes "
                         f"({', '.join(meta.class_names)}); check --mask-kind or the checkpoint")
    return classes, errors


def _as_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> list[Counts]:
    """One :class:`Counts` per row of ``(N, K)`` TP, FP and FN."""
    return [Counts(tp=tuple(int(v) for v in tp[i]), fp=tuple(int(v) for v in fp[i]),
                   fn=tuple(int(v) for v in fn[i])) for i in range(len(tp))]


def counts_from_confusion(cm: np.ndarray) -> list[Counts]:
    """One :class:`Counts` per ``(K, K)`` ``[gt, pred]`` confusion matrix of ``(N, K, K)`` ``cm``."""
    return _as_counts(*counts_from_matrices(cm))


def count_against_gt(pred: np.ndarray, gt: np.ndarray, *, mask_kind: str, meta: ModelMeta) -> list[Counts]:
    """Per-image :class:`Counts` of ``(N, H, W)`` predicted classes against ``(N, H, W)`` raw ground
    truth (class ids, or instance ids when ``mask_kind="instance"``). An image whose ground truth
    holds a label the model lacks gets a Counts with only ``error`` set."""
    classes, errors = checked_gt(gt, mask_kind=mask_kind, meta=meta)
    out: list[Counts | None] = [Counts(error=errors[i]) if i in errors else None for i in range(len(classes))]
    good = [i for i in range(len(classes)) if i not in errors]
    if good:
        for i, counts in zip(good, _as_counts(*confusion_counts(np.asarray(pred)[good], classes[good],
                                                               meta.num_classes))):
            out[i] = counts
    return out  # type: ignore[return-value]


def sum_counts(parts: Sequence[Counts]) -> Counts:
    """The counts of an image from those of its blocks (the first error wins)."""
    for p in parts:
        if p.error is not None:
            return p
    if not parts:
        return Counts()
    return Counts(tp=tuple(int(v) for v in np.sum([p.tp for p in parts], axis=0)),
                  fp=tuple(int(v) for v in np.sum([p.fp for p in parts], axis=0)),
                  fn=tuple(int(v) for v in np.sum([p.fn for p in parts], axis=0)))


def dice_rows(rows: Sequence[Mapping[str, Any]], counts: Mapping[str, Counts], *, meta: ModelMeta,
              checkpoint_sha256: str, unit: str) -> pa.Table:
    """The Dice table of some images (see the module docstring for the policy).

    Args:
        rows: manifest rows of the images (``image_id``, ``status``, ``error``, ``mask_status``,
            ``mask_error``).
        counts: by image id, the counts of the images that were scored against ground truth.
        unit: the work unit (or tiled-image part) the rows belong to.
    """
    ids: list[str] = []
    notes: list[str] = []
    scored: list[Counts] = []
    errors: list[tuple[str, str]] = []
    for row in rows:
        usable, problem = ground_truth_state(row)
        note, refused = channel_state(row, model_channels=meta.in_channels) if row["status"] == "ok" else ("", None)
        got = counts.get(row["image_id"])
        if problem is not None or refused is not None:
            errors.append((row["image_id"], refused or problem))
        elif usable and got is not None:
            if got.error is not None:
                errors.append((row["image_id"], got.error))
            else:
                ids.append(row["image_id"])
                notes.append(note)
                scored.append(got)
    c = meta.num_classes
    tp, fp, fn = (np.asarray([getattr(s, name) for s in scored], dtype=np.int64).reshape(len(scored), c)
                  for name in ("tp", "fp", "fn"))
    dice, empty = dice_from_counts(tp, fp, fn)
    return dice_table(image_ids=ids, class_names=meta.class_names, tp=tp, fp=fp, fn=fn, dice=dice, empty_gt=empty,
                      model=meta.arch, checkpoint_sha256=checkpoint_sha256, unit=unit, errors=errors,
                      channels_adapted=notes)
