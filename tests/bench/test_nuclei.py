"""bench/nuclei.py's ``--pretrain-scale auto``: the scale it picks gives synthetic nuclei of the
median area of the labels it was given."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from segcore.synthetic import make_instance_sample

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import nuclei  # noqa: E402 - bench/nuclei.py


def _median_area(scale: float) -> float:
    areas = []
    for stream in np.random.SeedSequence(11).spawn(60):
        labels = make_instance_sample(np.random.default_rng(stream), size=128, scale=scale)[1]
        areas += np.bincount(labels.ravel())[1:].tolist()
    return float(np.median(areas))


@pytest.mark.parametrize("side", [14, 24])
def test_the_matching_scale_gives_nuclei_of_the_labels_median_area(side: int) -> None:
    labels = np.zeros((200, 200), dtype=np.uint16)
    for k in range(9):  # nine squares of side x side pixels
        y, x = divmod(k, 3)
        labels[y * 60:y * 60 + side, x * 60:x * 60 + side] = k + 1
    scale = nuclei.matching_scale(labels, seed=0)
    assert _median_area(scale) == pytest.approx(side * side, rel=0.15)
    assert (scale > 1) == (side * side > _median_area(1.0))
