"""The channel policy: how images whose channel count differs from the model's are fed to it.

Applied at segmentation, to each image's raw pixels just before the model's normalisation
(:meth:`segcore.models.predict.Predictor.prepare`); whole-image units and tiled blocks both go
through :func:`adapt_images`. The stored images and the ground truth are never changed.

=========================  ==============  ====================================================
image channels             model channels  what the model gets (``channels_adapted``)
=========================  ==============  ====================================================
same as the model          any             the pixels as they are (``""``)
1 (grey)                   3               the grey channel replicated three times (``grey->rgb``)
3 (RGB)                    1               luminance (``rgb->grey``)
4 (RGBA), constant alpha   3               the RGB channels, alpha dropped (``rgba->rgb``)
4 (RGBA), constant alpha   1               luminance of the RGB channels (``rgba->grey``)
anything else              --              not adapted: an error row naming both counts
=========================  ==============  ====================================================

Luminance uses the ITU-R BT.601 weights ``Y = 0.299 R + 0.587 G + 0.114 B`` (:data:`LUMA_BT601`),
computed in float32 on the raw values (before any normalisation), so an 8-bit RGB image becomes a
float32 grey image in 0..255 and is then normalised as the model prescribes. An RGBA image whose
alpha varies within the image (a real mask or transparency) is not adapted: dropping the alpha
would change what the image shows. A tiled large image is judged block by block (each block's
read window): a block whose alpha varies is refused.
"""

from __future__ import annotations

import numpy as np

from segcore.errors import SegflowError

#: ITU-R BT.601 luma weights of the R, G and B channels.
LUMA_BT601 = (0.299, 0.587, 0.114)

_NOTES = {(1, 3): "grey->rgb", (3, 1): "rgb->grey", (4, 3): "rgba->rgb", (4, 1): "rgba->grey"}


class ChannelError(SegflowError, ValueError):
    """Images whose channels cannot be adapted to the model's."""


def channel_note(channels: int, *, model_channels: int) -> str:
    """The adaptation of ``channels``-channel images to a ``model_channels`` model: ``""`` (none
    needed), ``grey->rgb``, ``rgb->grey``, ``rgba->rgb`` or ``rgba->grey``.

    Raises :class:`ChannelError` when the channel counts cannot be adapted.
    """
    if channels == model_channels:
        return ""
    note = _NOTES.get((channels, model_channels))
    if note is None:
        raise ChannelError(f"{channels}-channel image but the model takes {model_channels} channel(s); segflow "
                           "adapts only grey <-> RGB and RGBA with a constant alpha: convert the image or use "
                           f"a model trained on {channels}-channel images")
    return note


def can_adapt(channels: int, *, model_channels: int) -> bool:
    """Whether ``channels``-channel images can be fed to a ``model_channels`` model (RGBA: when its
    alpha is constant)."""
    return channels == model_channels or (channels, model_channels) in _NOTES


def alpha_varies(images: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: whether the alpha (last) channel of each ``(N, H, W, 4)`` image takes more than one value."""
    alpha = np.asarray(images)[..., 3].reshape(len(images), -1)
    if alpha.shape[1] == 0:
        return np.zeros(len(images), dtype=bool)
    return alpha.min(axis=1) != alpha.max(axis=1)


def luminance(images: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RGB pixels of any numeric dtype -> ``(..., 1)`` float32 BT.601 luminance."""
    return (np.asarray(images, dtype=np.float32) @ np.asarray(LUMA_BT601, dtype=np.float32))[..., None]


def adapt_channels(images: np.ndarray, *, model_channels: int) -> tuple[np.ndarray, str]:
    """Adapt a batch of raw ``(N, H, W, C)`` images to the model's channel count.

    Returns ``(images, note)``: ``(N, H, W, model_channels)`` pixels (the input itself when no
    adaptation is needed; replicated grey and RGB from RGBA keep the input dtype; luminance is
    float32) and the note of :func:`channel_note`. Raises :class:`ChannelError` when the counts
    cannot be adapted or an RGBA image of the batch has a varying alpha.
    """
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {images.shape}")
    channels = images.shape[-1]
    note = channel_note(channels, model_channels=model_channels)
    if not note:
        return images, note
    if channels == 4:
        varying = np.flatnonzero(alpha_varies(images))
        if varying.size:
            raise ChannelError(f"RGBA image(s) {varying.tolist()} of the batch have a varying alpha channel, so "
                               f"they cannot be fed to a {model_channels}-channel model; flatten them onto a "
                               "background first")
        images = images[..., :3]
    if model_channels == 1 and images.shape[-1] == 3:
        return luminance(images), note
    if channels == 1 and model_channels == 3:
        return np.repeat(images, 3, axis=-1), note
    return images, note


def adapt_images(images: np.ndarray, *, model_channels: int) -> tuple[np.ndarray, str, dict[int, str]]:
    """:func:`adapt_channels` image by image of one store group's ``(N, H, W, C)`` images, refusing
    only those that cannot be adapted.

    Returns ``(adapted, note, refused)``: ``(N, H, W, model_channels)`` pixels in which every
    refused image is zeros (so a batch keeps its shape), the group's note, and ``{index in the
    batch: message}`` of the refused images (every image when the channel counts cannot be
    adapted; RGBA images with a varying alpha otherwise).
    """
    channels = images.shape[-1]
    if not can_adapt(channels, model_channels=model_channels):
        try:
            channel_note(channels, model_channels=model_channels)
        except ChannelError as exc:
            message = str(exc)
        dtype = images.dtype if model_channels != 1 else np.float32
        return (np.zeros(images.shape[:3] + (model_channels,), dtype=dtype), "",
                {i: message for i in range(len(images))})
    refused: dict[int, str] = {}
    if channels == 4 and channels != model_channels:
        for i in np.flatnonzero(alpha_varies(images)).tolist():
            refused[i] = (f"RGBA image with a varying alpha channel cannot be fed to the {model_channels}-channel "
                          "model (dropping alpha would change the image); flatten it onto a background first")
        if refused:
            images = images.copy()
            images[list(refused), ..., 3] = 0
    adapted, note = adapt_channels(images, model_channels=model_channels)
    if refused:
        adapted[list(refused)] = 0  # ``adapted`` is new or a view of the copy above, never the caller's
    return adapted, note, refused


__all__ = ["LUMA_BT601", "ChannelError", "adapt_channels", "adapt_images", "alpha_varies", "can_adapt",
           "channel_note", "luminance"]
