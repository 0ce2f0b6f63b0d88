"""Tests for the Mask R-CNN architectures: builders, eval and train contracts, the instance
prediction adapter and the checkpoint round trip. Images are tiny (CPU Mask R-CNN is slow)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segcore.models.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from segcore.models.record import describe_model
from segcore.errors import ConfigError
from segcore.models.instances import instances_to_labels, predict_instances, targets_from_instance_labels
from segcore.models import MODEL_KINDS, create_model
from segcore.models.maskrcnn import InputTransform, InstanceSegmenter

LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
SMALL = {"box_detections_per_img": 6}


@pytest.fixture(scope="module")
def r18() -> InstanceSegmenter:
    torch.manual_seed(0)
    return create_model("maskrcnn_r18", in_channels=1, num_classes=3, **SMALL).eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(2, 1, 64, 48, generator=torch.Generator().manual_seed(1))


def test_kinds_are_instance() -> None:
    assert MODEL_KINDS["maskrcnn"] == MODEL_KINDS["maskrcnn_r18"] == "instance"


@pytest.mark.parametrize("arch", ["maskrcnn", "maskrcnn_r18"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_builders(arch: str, in_channels: int) -> None:
    model = create_model(arch, in_channels=in_channels, num_classes=4, **SMALL)
    assert isinstance(model, InstanceSegmenter)
    assert (model.in_channels, model.num_classes) == (in_channels, 4)
    assert model.detector.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert model.detector.roi_heads.detections_per_img == 6
    transform = model.detector.transform
    assert isinstance(transform, InputTransform) and transform.keep_size
    assert transform.image_mean == [0.0, 0.0, 0.0] and transform.image_std == [1.0, 1.0, 1.0]
    assert all(p.requires_grad for p in model.parameters())  # every backbone layer trainable
    assert len(model.detector.backbone.body.layer3) == {"maskrcnn": 6, "maskrcnn_r18": 2}[arch]  # ResNet-50 / 18


def test_r18_anchors_suit_small_objects() -> None:
    model = create_model("maskrcnn_r18", **SMALL)
    assert model.detector.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    custom = create_model("maskrcnn", anchor_sizes=[4, 8, 16, 32, 64], **SMALL)
    assert custom.detector.rpn.anchor_generator.sizes[0] == (4,)


@pytest.mark.parametrize("kwargs", [
    {"in_channels": 2}, {"num_classes": 1}, {"num_classes": 300}, {"min_size": 32},
    {"min_size": 64, "max_size": 32}, {"box_detections_per_img": 0}, {"score_threshold": 1.0},
    {"mask_threshold": -0.1}, {"anchor_sizes": (8, 16)}, {"bogus": 1}, {"overlap_threshold": 0.0},
])
def test_bad_arguments_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="maskrcnn_r18"):
        create_model("maskrcnn_r18", **kwargs)


def test_eval_forward_returns_torchvisions_contract(r18: InstanceSegmenter, batch: torch.Tensor) -> None:
    with torch.no_grad():
        out = r18(batch)
        rois = r18.detect(batch)
    assert len(out) == 2
    for det, roi in zip(out, rois):
        k = det["boxes"].shape[0]
        assert 0 < k <= 6
        assert det["masks"].shape == (k, 1, 64, 48) and roi["masks"].shape == (k, 1, 28, 28)
        assert det["labels"].dtype == torch.int64 and set(det["labels"].tolist()) <= {1, 2}
        assert torch.all(det["scores"][:-1] >= det["scores"][1:]) and torch.all(det["scores"] > r18.score_threshold)
        boxes = det["boxes"]
        assert torch.all(boxes[:, 2:] <= torch.tensor([48.0, 64.0])) and torch.all(boxes >= 0)
        torch.testing.assert_close(det["masks"], paste_masks_in_image(roi["masks"], roi["boxes"], (64, 48)))


def test_wrong_input_is_refused(r18: InstanceSegmenter) -> None:
    with pytest.raises(ConfigError, match=r"\(N, 1, H, W\)"):
        r18(torch.rand(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="float"):
        r18(torch.ones(1, 1, 32, 32, dtype=torch.uint8))


def test_resizing_keeps_boxes_in_input_coordinates() -> None:
    torch.manual_seed(0)
    model = create_model("maskrcnn_r18", min_size=32, max_size=32, **SMALL).eval()
    assert not model.detector.transform.keep_size
    with torch.no_grad():
        det = model.detect(torch.rand(1, 1, 96, 64))[0]
    assert det["boxes"].shape[0] > 0
    assert det["boxes"][:, 3].max() > 33  # scaled back from the 32-px internal image


def test_train_mode_returns_finite_losses_for_label_image_targets() -> None:
    torch.manual_seed(3)
    model = create_model("maskrcnn_r18", in_channels=3, num_classes=3, **SMALL).train()
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[10:24, 12:30] = 4
    labels[40:64, 50:64] = 9  # cut by two borders
    targets = [targets_from_instance_labels(labels, {4: 1, 9: 2}),
               targets_from_instance_labels(np.zeros((64, 64), dtype=np.int32))]  # an empty image
    losses = model(torch.rand(2, 3, 64, 64), targets)
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ConfigError, match="target"):
        model(torch.rand(2, 3, 64, 64))


def test_predict_instances_contract(r18: InstanceSegmenter, batch: torch.Tensor) -> None:
    preds = predict_instances(r18, batch)
    assert len(preds) == 2 and any(p.records for p in preds)
    for pred in preds:
        assert pred.labels.shape == pred.classes.shape == (64, 48)
        assert pred.labels.dtype == np.uint32 and pred.classes.dtype == np.uint8
        ids = [r["instance_id"] for r in pred.records]
        assert ids == list(range(1, len(ids) + 1)) and set(np.unique(pred.labels)) <= {0, *ids}
        for r in pred.records:
            assert r["score"] > r18.score_threshold and r["class_id"] in (1, 2)
    strict = predict_instances(r18, batch, score_threshold=0.4, mask_threshold=0.6)
    assert all(r["score"] > 0.4 for p in strict for r in p.records)
    with pytest.raises(ConfigError, match="below the model"):
        predict_instances(r18, batch, score_threshold=0.01)


def test_a_checkpoints_overlap_threshold_applies_in_predict_instances(tmp_path, r18: InstanceSegmenter,
                                                                      batch: torch.Tensor) -> None:
    meta = ModelMeta(arch="maskrcnn_r18", arch_kwargs={**SMALL, "overlap_threshold": 0.2},
                     class_names=("background", "nucleus", "other"), in_channels=1)
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", r18, meta))
    assert r18.overlap_threshold is None and loaded.overlap_threshold == 0.2
    assert "hold more than 0.2 of is dropped" in describe_model(tmp_path / "m.safetensors")["output"]
    with torch.no_grad():
        detections = loaded.detect(batch)
    dropped = 0
    for det, pred, every in zip(detections, predict_instances(loaded, batch), predict_instances(r18, batch)):
        want = instances_to_labels(**{k: det[k] for k in ("boxes", "scores", "labels", "masks")},
                                   image_size=(64, 48), overlap_threshold=0.2)
        np.testing.assert_array_equal(pred.labels, want.labels)
        assert pred.records == want.records
        dropped += len(every.records) - len(pred.records)
    assert dropped > 0  # the random model's detections overlap, so the rule had something to drop


def test_predict_instances_needs_eval_mode() -> None:
    model = create_model("maskrcnn_r18", **SMALL).train()
    with pytest.raises(ConfigError, match="eval"):
        predict_instances(model, torch.rand(1, 1, 32, 32))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, r18: InstanceSegmenter, batch: torch.Tensor) -> None:
    r18 = copy.deepcopy(r18)
    with torch.no_grad():  # move BatchNorm statistics away from their initial values
        for name, t in r18.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                t.add_(0.01 * torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape) / t.numel())
    meta = ModelMeta(arch="maskrcnn_r18", arch_kwargs=dict(SMALL), class_names=("background", "nucleus", "other"),
                     in_channels=1)
    assert meta.kind == "instance"
    path = save_checkpoint(tmp_path / "model.safetensors", r18, meta)
    torch.manual_seed(123)  # the rebuilt model starts from other random weights
    loaded, got_meta = load_checkpoint(path)
    assert got_meta == meta and isinstance(loaded, InstanceSegmenter)
    with torch.no_grad():
        before, after = r18.detect(batch), loaded.detect(batch)
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for p, q in zip(predict_instances(r18, batch), predict_instances(loaded, batch)):
        np.testing.assert_array_equal(p.labels, q.labels)
        assert p.records == q.records
