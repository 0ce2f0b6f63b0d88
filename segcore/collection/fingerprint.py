"""A store's dataset fingerprint: what its pixel values and mask labels look like, recorded at ingest.

``{"dtype": "float32", "dtypes": [...], "channels": 1, "min": -1063.25, "max": 1684.25,
"negative": true, "images": 96, "mask_maxima": {"0": 10, "2": 86}}`` sits in the store's attributes
(``segflow.fingerprint``). Each chunk write records every decoded image's value range in its row
(``value_min``, ``value_max``) and, for class-map ground truth, the largest label of its mask
(``mask_max``; none of them manifest columns); the ingest's finish folds them with the
fingerprint the store already had (an incremental ingest widens it). ``mask_maxima`` counts the
labelled images by their mask's largest label, so a run can tell before any work how many images
hold labels a model lacks (:func:`segcore.run.start.check_mask_labels`). ``segflow train
--normalisation auto`` chooses a scheme from the values
(:func:`segcore.normalise_fit.choose_normalisation`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

ATTR = "fingerprint"


def value_range(image: np.ndarray) -> dict[str, float]:
    """``{"value_min", "value_max"}`` of one decoded image (NaNs ignored; 0, 0 when all are NaN)."""
    a = np.asarray(image)
    if a.size == 0 or (a.dtype.kind == "f" and np.isnan(a).all()):
        return {"value_min": 0.0, "value_max": 0.0}
    return {"value_min": float(np.nanmin(a)), "value_max": float(np.nanmax(a))}


def fold(rows: Iterable[Mapping[str, Any]], previous: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The fingerprint of ``previous`` widened by the decoded rows (``status == "ok"`` with a value
    range); ``None`` when there is neither."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("value_min") is not None]
    if not ok:
        return dict(previous) if previous else None
    dtypes = sorted({str(r["dtype"]) for r in ok} | set((previous or {}).get("dtypes", [])))
    lo = min(r["value_min"] for r in ok)
    hi = max(r["value_max"] for r in ok)
    if previous:
        lo, hi = min(lo, previous["min"]), max(hi, previous["max"])
    channels = max([int(r["channels"]) for r in ok] + [int((previous or {}).get("channels", 0))])
    out = {"dtype": dtypes[0] if len(dtypes) == 1 else "mixed", "dtypes": dtypes, "channels": channels,
           "min": float(lo), "max": float(hi), "negative": bool(lo < 0),
           "images": len(ok) + int((previous or {}).get("images", 0))}
    maxima = _mask_maxima(ok, previous)
    if maxima is not None:
        out["mask_maxima"] = maxima
    return out


def _mask_maxima(ok: list[Mapping[str, Any]], previous: Mapping[str, Any] | None) -> dict[str, int] | None:
    """``{label: images}`` of the rows' ``mask_max`` added to ``previous``'s (``{}`` when no image
    has class-map ground truth); None, unknown, when ``previous`` was recorded before mask labels
    were (its images' labels were never counted)."""
    if previous and "mask_maxima" not in previous:
        return None
    counts = {k: int(v) for k, v in ((previous or {}).get("mask_maxima") or {}).items()}
    for r in ok:
        if r.get("mask_status") == "ok" and r.get("mask_max") is not None:
            counts[str(int(r["mask_max"]))] = counts.get(str(int(r["mask_max"])), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def of_images(images: np.ndarray) -> dict[str, Any]:
    """The fingerprint of ``(N, H, W, C)`` images in memory (for stores ingested before fingerprints)."""
    rows = [dict(status="ok", dtype=str(images.dtype), channels=images.shape[-1], **value_range(im)) for im in images]
    out = fold(rows) or {}
    out.pop("mask_maxima", None)  # no masks were looked at
    return out


def read_fingerprint(store_path: str) -> dict[str, Any] | None:
    """The fingerprint recorded in a store's attributes; ``None`` for stores made before it existed."""
    from segcore.collection.store import store_root  # the store module imports this one

    root = store_root(store_path)
    return dict(root.attrs).get("segflow", {}).get(ATTR)


def write_fingerprint(store_path: str, fingerprint: Mapping[str, Any] | None) -> None:
    """Record ``fingerprint`` in the store's attributes (nothing to do for ``None``)."""
    if fingerprint is None:
        return
    from segcore.collection.store import store_root

    root = store_root(store_path, mode="r+")
    attrs = dict(root.attrs)["segflow"]
    root.attrs["segflow"] = {**attrs, ATTR: dict(fingerprint)}


__all__ = ["ATTR", "fold", "of_images", "read_fingerprint", "value_range", "write_fingerprint"]
