"""The settings of the semantic training recipe, as one validated, frozen record."""

from __future__ import annotations

from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

#: What each augmentation setting does (recorded in the provenance).
AUGMENTATIONS: Mapping[str, str] = {
    "flip_rot90": "flip, rot90",
    "full": "flip, rot90, affine (rotation +/-15 deg, scale +/-10 %, p 0.3), intensity scale +/-10 % and "
            "shift +/-0.1 (p 0.5 each)",
}
#: Default training patch side: larger images are sampled in patches, smaller ones taken whole.
DEFAULT_PATCH_SIZE = 256
#: Patches per epoch at least, for ``segflow train``'s UNet: a collection of a few dozen images
#: still gets 16 optimiser steps of 16 patches per epoch (50 epochs: 800 steps).
DEFAULT_MIN_EPOCH_PATCHES = 256


class Recipe(BaseModel):
    """How a semantic model is trained, apart from epochs, batch size, learning rate and split."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    patch_size: int = Field(DEFAULT_PATCH_SIZE, gt=0, description="Training patch side in pixels.")
    fg_fraction: float = Field(1 / 3, ge=0, le=1, description="Share of each batch centred on a foreground pixel.")
    min_epoch_patches: int = Field(0, ge=0, description="Patches drawn per epoch at least (an epoch draws as many "
                                                        "as there are training images, or this many if more).")
    augmentation: Literal["flip_rot90", "full"] = "full"
    schedule: Literal["onecycle", "poly", "cosine"] = "poly"
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming up.")
    device: str = Field("cpu", description="cpu or cuda:N (resolved by segcore.models.predict.resolve_device).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast dtype on CUDA.")
    largest_region: Literal["auto", "on", "off"] = Field(
        "auto", description="Keep only each image's largest connected foreground region in the model's masks "
                            "(segcore.models.outputs.OutputRule.largest_region): auto turns it on when it raises "
                            "the validation split's mean foreground Dice, and leaves it off with val_fraction 0 "
                            "(nothing held out to decide by) (2-D models; volumetric ones: off).")
    refit: bool = Field(False, description="After training with the validation split, train again from the same "
                                           "start on every image, split included, for the best epoch's number of "
                                           "epochs, and keep that model (the normalisation, the largest-region "
                                           "decision and the validation figures stay those of the split run); "
                                           "refused with val_fraction 0 (no split to run first).")


__all__ = ["AUGMENTATIONS", "DEFAULT_MIN_EPOCH_PATCHES", "DEFAULT_PATCH_SIZE", "Recipe"]
