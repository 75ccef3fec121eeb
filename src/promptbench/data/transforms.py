"""Input pipelines of the protocol (protocol.md section 3), sized to the backbone's input resolution."""

from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T

BICUBIC = T.InterpolationMode.BICUBIC
# CoOp's RandomResizedCrop area range for training images.
DEFAULT_CROP_SCALE = (0.08, 1.0)


def _to_tensor_normalized(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToTensor(), T.Normalize(mean, std)]


def _test_crop(size: int) -> list:
    """Resize the shorter side then centre-crop: a square squash would change zero-shot numbers by points."""
    return [T.Resize(size, interpolation=BICUBIC), T.CenterCrop(size)]


def test_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([*_test_crop(size), *_to_tensor_normalized(mean, std)])


def pixel_transform(size: int) -> T.Compose:
    """The test transform without its normalisation: [0, 1] pixels, the space an adversarial attack perturbs
    (robustness.py normalises inside the attacked function with `Backbone.normalize`)."""
    return T.Compose([*_test_crop(size), T.ToTensor()])


def train_transform(
    size: int, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float] = DEFAULT_CROP_SCALE
) -> T.Compose:
    """CoOp's augmentation; Tip-Adapter's cache uses scale=(0.5, 1.0)."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=tuple(scale), interpolation=BICUBIC),
            T.RandomHorizontalFlip(),
            *_to_tensor_normalized(mean, std),
        ]
    )
