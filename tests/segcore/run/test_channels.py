"""The channel policy on tiny hand-computed images."""

from __future__ import annotations

import numpy as np
import pytest

from segcore.errors import SegflowError
from segcore.models.checkpoint import ModelMeta
from segcore.normalise import Normalisation
from segcore.run.channels import (ChannelError, adapt_channels, adapt_images, alpha_varies, can_adapt,
                                  channel_note)
from segcore.run.context import Counts
from segcore.run.evaluate import dice_rows


def test_same_channels_pass_through_untouched():
    images = np.arange(12, dtype=np.uint16).reshape(1, 2, 2, 3)
    out, note = adapt_channels(images, model_channels=3)
    assert out is images and note == ""


def test_grey_is_replicated_to_three_channels_keeping_dtype():
    images = np.array([[[[7], [200]]]], dtype=np.uint8)  # (1, 1, 2, 1)
    out, note = adapt_channels(images, model_channels=3)
    assert note == "grey->rgb"
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 3)
    assert out[0, 0].tolist() == [[7, 7, 7], [200, 200, 200]]


def test_rgb_becomes_bt601_luminance_in_float32():
    pixels = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [100, 100, 100]]
    images = np.array(pixels, dtype=np.uint8).reshape(1, 2, 2, 3)
    out, note = adapt_channels(images, model_channels=1)
    assert note == "rgb->grey"
    assert out.dtype == np.float32 and out.shape == (1, 2, 2, 1)
    # 0.299 * 255, 0.587 * 255, 0.114 * 255, and the weights sum to 1
    np.testing.assert_allclose(out.reshape(-1), [76.245, 149.685, 29.07, 100.0], rtol=1e-6)


def test_rgb_luminance_is_computed_on_raw_16_bit_values():
    images = np.array([[[[1000, 2000, 3000]]]], dtype=np.uint16)
    out, _ = adapt_channels(images, model_channels=1)
    np.testing.assert_allclose(out.reshape(-1), [299.0 + 1174.0 + 342.0], rtol=1e-6)  # 1815


def test_rgba_with_constant_alpha_drops_alpha():
    images = np.array([[[[10, 20, 30, 255], [40, 50, 60, 255]]]], dtype=np.uint8)
    rgb, note = adapt_channels(images, model_channels=3)
    assert note == "rgba->rgb" and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [[10, 20, 30], [40, 50, 60]]
    grey, note = adapt_channels(images, model_channels=1)
    assert note == "rgba->grey"
    # 0.299*10 + 0.587*20 + 0.114*30 = 18.15; 0.299*40 + 0.587*50 + 0.114*60 = 48.15
    np.testing.assert_allclose(grey.reshape(-1), [18.15, 48.15], rtol=1e-6)


def test_rgba_with_varying_alpha_is_refused():
    images = np.array([[[[10, 20, 30, 255], [40, 50, 60, 0]]]], dtype=np.uint8)
    assert alpha_varies(images).tolist() == [True]
    with pytest.raises(ChannelError, match="varying alpha"):
        adapt_channels(images, model_channels=3)


@pytest.mark.parametrize("channels,model", [(2, 1), (2, 3), (5, 3), (5, 1), (1, 2), (3, 4)])
def test_other_counts_cannot_be_adapted_and_the_message_names_both(channels, model):
    assert not can_adapt(channels, model_channels=model)
    with pytest.raises(ChannelError) as info:
        adapt_channels(np.zeros((1, 2, 2, channels), np.uint8), model_channels=model)
    assert isinstance(info.value, SegflowError) and isinstance(info.value, ValueError)
    assert f"{channels}-channel image" in str(info.value) and f"takes {model} channel(s)" in str(info.value)


def test_channel_note_names_each_adaptation():
    assert [channel_note(c, model_channels=m) for c, m in [(1, 1), (1, 3), (3, 1), (4, 3), (4, 1), (4, 4)]] == [
        "", "grey->rgb", "rgb->grey", "rgba->rgb", "rgba->grey", ""]


def test_adapt_images_refuses_only_the_varying_alpha_image():
    images = np.array([[[[10, 20, 30, 9], [40, 50, 60, 9]]],
                       [[[10, 20, 30, 255], [40, 50, 60, 0]]]], dtype=np.uint8)  # (2, 1, 2, 4)
    before = images.copy()
    adapted, note, refused = adapt_images(images, model_channels=3)
    assert note == "rgba->rgb" and list(refused) == [1] and "varying alpha" in refused[1]
    assert adapted.shape == (2, 1, 2, 3)
    assert adapted[0, 0].tolist() == [[10, 20, 30], [40, 50, 60]]
    assert not adapted[1].any()
    np.testing.assert_array_equal(images, before)  # the caller's array is not changed


def test_adapt_images_refuses_every_image_of_a_count_it_cannot_adapt():
    adapted, note, refused = adapt_images(np.ones((3, 2, 2, 5), np.uint8), model_channels=1)
    assert note == "" and sorted(refused) == [0, 1, 2]
    assert "5-channel image" in refused[0] and "takes 1 channel(s)" in refused[0]
    assert adapted.shape == (3, 2, 2, 1) and not adapted.any()


def test_adapt_images_without_refusals_equals_adapt_channels():
    images = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    adapted, note, refused = adapt_images(images, model_channels=1)
    expected, _ = adapt_channels(images, model_channels=1)
    assert refused == {} and note == "rgb->grey"
    np.testing.assert_array_equal(adapted, expected)


META = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "fg"), in_channels=1,
                 normalisation=Normalisation(mode="range", scale=255.0))


def _row(image_id: str, channels: int | None, *, status: str = "ok", mask_status: str = "ok") -> dict:
    return {"image_id": image_id, "channels": channels, "status": status, "error": None,
            "mask_status": mask_status, "mask_error": None}


def test_dice_rows_record_the_adaptation_and_refuse_what_cannot_be_adapted():
    counts = {i: Counts(tp=(3, 1), fp=(0, 1), fn=(1, 0)) for i in ("grey", "rgb", "rgba", "five")}
    rows = [_row("grey", 1), _row("rgb", 3), _row("rgba", 4), _row("five", 5), _row("two", 2, mask_status="missing")]
    table = dice_rows(rows, counts, meta=META, checkpoint_sha256="c" * 64, unit="u").to_pylist()
    by_image = {(r["image_id"], r["class_id"]): r for r in table}
    assert [by_image[(i, 0)]["channels_adapted"] for i in ("grey", "rgb", "rgba")] == ["", "rgb->grey", "rgba->grey"]
    assert by_image[("rgb", 1)]["dice"] == pytest.approx(2 / 3)  # 2*1 / (2*1 + 1 + 0)
    # refused whether or not the image has ground truth, one error row per class
    for image in ("five", "two"):
        assert [by_image[(image, k)]["status"] for k in (0, 1)] == ["error", "error"]
    assert "5-channel image but the model takes 1 channel(s)" in by_image[("five", 0)]["error"]
    assert "2-channel image" in by_image[("two", 1)]["error"]
