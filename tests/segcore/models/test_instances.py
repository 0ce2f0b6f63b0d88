"""Tests for segcore.models.instances: hand-computed label images, bounded pasting equal to torchvision's
full paste, invariants of the output contract, training targets, and the memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segcore.errors import ConfigError
from segcore.models.instances import InstancePrediction, instances_to_labels, targets_from_instance_labels

FG, BG = 0.8, 0.1


def _image_masks(h: int, w: int, regions: list[tuple[slice, slice]]) -> torch.Tensor:
    masks = torch.full((len(regions), 1, h, w), BG)
    for j, (rows, cols) in enumerate(regions):
        masks[j, 0, rows, cols] = FG
    return masks


def test_overlaps_go_to_the_higher_score_and_empty_instances_are_dropped() -> None:
    # A (0.6) and B (0.9) overlap on columns 2-3; C (0.3) lies inside B; D (0.2) is one pixel.
    masks = _image_masks(4, 6, [(slice(0, 3), slice(0, 4)), (slice(0, 3), slice(2, 6)),
                                (slice(1, 3), slice(3, 5)), (slice(3, 4), slice(0, 1))])
    masks[3, 0, 3, 5] = 0.5  # exactly at the threshold: background
    pred = instances_to_labels(boxes=torch.tensor([[0, 0, 4, 3], [2, 0, 6, 3], [3, 1, 5, 3], [0, 3, 1, 4.0]]),
                               scores=torch.tensor([0.6, 0.9, 0.3, 0.2]), labels=torch.tensor([1, 2, 1, 2]),
                               masks=masks, image_size=(4, 6), mask_threshold=0.5, mask_form="image")
    assert isinstance(pred, InstancePrediction)
    assert pred.labels.dtype == np.uint32 and pred.classes.dtype == np.uint8
    np.testing.assert_array_equal(pred.labels, [[2, 2, 1, 1, 1, 1],
                                                [2, 2, 1, 1, 1, 1],
                                                [2, 2, 1, 1, 1, 1],
                                                [3, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(pred.classes, [[1, 1, 2, 2, 2, 2],
                                                 [1, 1, 2, 2, 2, 2],
                                                 [1, 1, 2, 2, 2, 2],
                                                 [2, 0, 0, 0, 0, 0]])
    got = [{**r, "score": round(r["score"], 4)} for r in pred.records]
    assert got == [
        {"instance_id": 1, "class_id": 2, "score": 0.9, "bbox": (2, 0, 6, 3), "area": 12},
        {"instance_id": 2, "class_id": 1, "score": 0.6, "bbox": (0, 0, 2, 3), "area": 6},  # tight: lost cols 2-3
        {"instance_id": 3, "class_id": 2, "score": 0.2, "bbox": (0, 3, 1, 4), "area": 1},
    ]


def test_an_overlap_threshold_drops_detections_mostly_held_by_higher_scores() -> None:
    # B (0.9) holds columns 2-5; A (0.6, columns 0-3) has 6 of its 12 pixels under B; F (0.5) is
    # columns 0-1, which only A would have held; C (0.3) lies inside B; D (0.2) is one pixel.
    masks = _image_masks(4, 6, [(slice(0, 3), slice(0, 4)), (slice(0, 3), slice(2, 6)),
                                (slice(1, 3), slice(3, 5)), (slice(3, 4), slice(0, 1)), (slice(0, 3), slice(0, 2))])
    args = dict(boxes=torch.tensor([[0, 0, 4, 3], [2, 0, 6, 3], [3, 1, 5, 3], [0, 3, 1, 4], [0, 0, 2, 3.0]]),
                scores=torch.tensor([0.6, 0.9, 0.3, 0.2, 0.5]), labels=torch.tensor([1, 2, 1, 2, 2]), masks=masks,
                image_size=(4, 6), mask_form="image")
    # A's share held is exactly 0.5: kept at 0.5 (only a larger share drops), F then finds its pixels taken.
    at_half = instances_to_labels(**args, overlap_threshold=0.5)
    np.testing.assert_array_equal(at_half.labels, [[2, 2, 1, 1, 1, 1],
                                                   [2, 2, 1, 1, 1, 1],
                                                   [2, 2, 1, 1, 1, 1],
                                                   [3, 0, 0, 0, 0, 0]])
    assert [round(r["score"], 4) for r in at_half.records] == [0.9, 0.6, 0.2]
    # Below A's share A is dropped and holds nothing, so F (none of it under B) keeps columns 0-1.
    lower = instances_to_labels(**args, overlap_threshold=0.4)
    np.testing.assert_array_equal(lower.labels, [[2, 2, 1, 1, 1, 1],
                                                 [2, 2, 1, 1, 1, 1],
                                                 [2, 2, 1, 1, 1, 1],
                                                 [3, 0, 0, 0, 0, 0]])
    assert [(round(r["score"], 4), r["class_id"], r["area"]) for r in lower.records] == [(0.9, 2, 12), (0.5, 2, 6),
                                                                                         (0.2, 2, 1)]
    np.testing.assert_array_equal(lower.classes[:3, :2], 2)
    # None (the default) keeps what is left of every detection, as before.
    kept = instances_to_labels(**args)
    assert [round(r["score"], 4) for r in kept.records] == [0.9, 0.6, 0.2]


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_an_overlap_threshold_outside_zero_to_one_is_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="overlap_threshold"):
        instances_to_labels(boxes=torch.tensor([[1.0, 1, 4, 4]]), scores=torch.tensor([0.9]), labels=torch.tensor([1]),
                            masks=torch.ones(1, 1, 28, 28), image_size=(8, 8), overlap_threshold=value)


def test_no_detections_give_an_empty_prediction() -> None:
    pred = instances_to_labels(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.int64),
                               masks=torch.zeros(0, 1, 28, 28), image_size=(5, 7))
    assert pred.labels.shape == (5, 7) and not pred.labels.any() and not pred.classes.any()
    assert pred.records == []


def test_a_box_outside_the_image_is_dropped() -> None:
    pred = instances_to_labels(boxes=torch.tensor([[40.0, 40, 50, 50], [1, 1, 6, 6]]), scores=torch.tensor([0.9, 0.5]),
                               labels=torch.tensor([1, 1]), masks=torch.ones(2, 1, 28, 28), image_size=(8, 8))
    assert [r["instance_id"] for r in pred.records] == [1]
    assert pred.records[0]["score"] == pytest.approx(0.5)
    assert set(np.unique(pred.labels)) == {0, 1}


@pytest.mark.parametrize("kwargs", [
    {"labels": torch.tensor([0])},                      # background class
    {"labels": torch.tensor([256])},                    # does not fit uint8
    {"masks": torch.ones(1, 28, 28)},                   # missing channel axis
    {"boxes": torch.ones(2, 4)},                        # K disagrees
    {"image_size": (0, 4)},
    {"mask_form": "pasted"},
])
def test_bad_inputs_are_config_errors(kwargs: dict) -> None:
    args = {"boxes": torch.tensor([[1.0, 1, 4, 4]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
            "masks": torch.ones(1, 1, 28, 28), "image_size": (8, 8)}
    with pytest.raises(ConfigError):
        instances_to_labels(**{**args, **kwargs})


def _random_case(seed: int, k: int, h: int, w: int) -> dict:
    """Boxes inside the image, as torchvision's ROI heads clip them (pasting still reaches past the border)."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, w - 0.5, k)
    y0 = rng.uniform(0, h - 0.5, k)
    x1 = np.minimum(x0 + rng.uniform(0.5, w + 0.5, k), w)
    y1 = np.minimum(y0 + rng.uniform(0.5, h + 0.5, k), h)
    boxes = np.stack([x0, y0, x1, y1], axis=1)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(rng.permutation(k) / max(k, 1) + 0.01, dtype=torch.float32),
            "labels": torch.tensor(rng.integers(1, 4, k), dtype=torch.int64),
            "masks": torch.tensor(rng.uniform(0, 1, (k, 1, 28, 28)), dtype=torch.float32)}


def _reference_labels(case: dict, size: tuple[int, int], thr: float) -> np.ndarray:
    """torchvision's full paste (K full-size masks), then lowest score painted first, ids in rank order."""
    full = paste_masks_in_image(case["masks"], case["boxes"], size)[:, 0].numpy() > thr
    order = np.argsort(-case["scores"].numpy(), kind="stable")
    prov = np.zeros(size, dtype=np.int64)
    for rank in range(len(order) - 1, -1, -1):
        prov[full[order[rank]]] = rank + 1
    kept = np.unique(prov[prov > 0])
    lut = np.zeros(len(order) + 1, dtype=np.int64)
    lut[kept] = np.arange(1, len(kept) + 1)
    return lut[prov]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(0, 8), h=st.integers(1, 40), w=st.integers(1, 40),
       thr=st.sampled_from([0.3, 0.5, 0.7]))
def test_bounded_pasting_equals_torchvisions_full_paste(seed: int, k: int, h: int, w: int, thr: float) -> None:
    case = _random_case(seed, k, h, w)
    pred = instances_to_labels(**case, image_size=(h, w), mask_threshold=thr)
    np.testing.assert_array_equal(pred.labels, _reference_labels(case, (h, w), thr))
    full = paste_masks_in_image(case["masks"], case["boxes"], (h, w)) if k else torch.zeros(0, 1, h, w)
    via_image = instances_to_labels(**{**case, "masks": full}, image_size=(h, w), mask_threshold=thr,
                                    mask_form="image")
    np.testing.assert_array_equal(pred.labels, via_image.labels)
    assert pred.records == via_image.records


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(0, 10), h=st.integers(1, 48), w=st.integers(1, 48))
def test_contract_invariants(seed: int, k: int, h: int, w: int) -> None:
    case = _random_case(seed, k, h, w)
    pred = instances_to_labels(**case, image_size=(h, w), mask_threshold=0.5)
    n = len(pred.records)
    assert [r["instance_id"] for r in pred.records] == list(range(1, n + 1))
    assert set(np.unique(pred.labels).tolist()) <= set(range(n + 1))
    scores = [r["score"] for r in pred.records]
    assert scores == sorted(scores, reverse=True)
    assert sum(r["area"] for r in pred.records) == int((pred.labels > 0).sum())
    np.testing.assert_array_equal(pred.classes == 0, pred.labels == 0)
    for r in pred.records:
        ys, xs = np.nonzero(pred.labels == r["instance_id"])
        x0, y0, x1, y1 = r["bbox"]
        assert r["area"] == ys.size > 0
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # inside and tight
        assert (pred.classes[ys, xs] == r["class_id"]).all()


def test_pasting_2048_squared_with_100_detections_stays_far_below_a_gigabyte(tmp_path) -> None:
    # torchvision's full paste would hold 100 x 2048 x 2048 float32 = 1.6 GB at once.
    script = textwrap.dedent("""
        import json, resource, torch
        from segcore.models.instances import instances_to_labels
        g = torch.Generator().manual_seed(0)
        k, size = 100, 2048
        xy = torch.rand(k, 2, generator=g) * 1500
        boxes = torch.cat([xy, xy + 50 + torch.rand(k, 2, generator=g) * 500], 1)
        boxes[:5] = torch.tensor([0.0, 0.0, size - 1, size - 1])  # five whole-image detections
        args = dict(boxes=boxes, scores=torch.rand(k, generator=g), labels=torch.ones(k, dtype=torch.int64),
                    masks=torch.rand(k, 1, 28, 28, generator=g), mask_threshold=0.5)
        instances_to_labels(**args, image_size=(64, 64))  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pred = instances_to_labels(**args, image_size=(size, size))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"grew_kib": after - before, "instances": len(pred.records),
                          "shape": list(pred.labels.shape)}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [2048, 2048] and report["instances"] > 5
    assert report["grew_kib"] < 256 * 1024, report  # MiB-scale, not GiB


def test_targets_from_instance_labels_by_hand() -> None:
    labels = np.array([[0, 7, 7, 0],
                       [0, 7, 0, 3],
                       [0, 0, 0, 3]], dtype=np.uint16)  # ids with a gap; 3 is cut by the right border
    t = targets_from_instance_labels(labels, {3: 2, 7: 1})
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8
    torch.testing.assert_close(t["boxes"], torch.tensor([[3.0, 1, 4, 3], [1, 0, 3, 2]]))
    assert t["labels"].tolist() == [2, 1]
    np.testing.assert_array_equal(t["masks"].numpy(), np.stack([labels == 3, labels == 7]).astype(np.uint8))
    assert targets_from_instance_labels(torch.from_numpy(labels.astype(np.int64)))["labels"].tolist() == [1, 1]


def test_targets_from_an_empty_image() -> None:
    t = targets_from_instance_labels(np.zeros((5, 6), dtype=np.int32))
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 5, 6)


@pytest.mark.parametrize(("labels", "classes"), [
    (np.zeros((2, 2, 2), dtype=np.int32), None),            # not 2-D
    (np.ones((2, 2), dtype=np.float32), None),               # not integer
    (np.array([[-1, 0]]), None),                             # negative id
    (np.array([[1, 2]]), {1: 1}),                            # id 2 has no class
    (np.array([[1, 0]]), {1: 0}),                            # background class
])
def test_bad_targets_are_config_errors(labels: np.ndarray, classes: dict | None) -> None:
    with pytest.raises(ConfigError):
        targets_from_instance_labels(labels, classes)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), h=st.integers(1, 20), w=st.integers(1, 20))
def test_target_masks_cover_the_labels_and_sit_in_their_boxes(seed: int, h: int, w: int) -> None:
    labels = np.random.default_rng(seed).choice([0, 0, 2, 5, 9], size=(h, w))
    t = targets_from_instance_labels(labels)
    masks = t["masks"].numpy().astype(bool)
    np.testing.assert_array_equal(masks.sum(axis=0), labels > 0)
    for m, (x0, y0, x1, y1) in zip(masks, t["boxes"].numpy().astype(int)):
        ys, xs = np.nonzero(m)
        assert x1 > x0 and y1 > y0
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
