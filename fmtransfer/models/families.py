"""What differs between model families, in one table keyed by family (not scattered through the code)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Architecture knowledge about a family of timm models.

    Attributes:
        name: family name.
        pattern: regex matched against the timm model name.
        takes_img_size: the constructor accepts ``img_size`` (position embeddings depend on it).
        takes_patch_size: the constructor accepts ``patch_size``.
    """

    name: str
    pattern: str
    takes_img_size: bool = False
    takes_patch_size: bool = False

    def matches(self, model_name: str) -> bool:
        return re.match(self.pattern, model_name) is not None


FAMILIES: tuple[Family, ...] = (
    Family("vit", r"^(vit_|deit|test_vit|eva|beit|flexivit|samvit)", takes_img_size=True, takes_patch_size=True),
    Family("swin", r"^(swin|test_swin)", takes_img_size=True),
    Family("convnext", r"^(convnext|test_convnext)"),
    Family("resnet", r"^(resnet|resnext|wide_resnet|seresnet|test_resnet|resnetrs)"),
    Family("efficientnet", r"^(efficientnet|tf_efficientnet|mobilenet|test_efficientnet)"),
)
GENERIC = Family("generic", r".*")


def family_of(model_name: str) -> Family:
    """The family of a timm model name (``generic`` when none matches)."""
    for family in FAMILIES:
        if family.matches(model_name):
            return family
    return GENERIC


def auto_patch_size(img_size: tuple[int, int], default: int = 16) -> int:
    """Patch size for small images: the largest of 16/8/4/2 that divides the image and leaves a grid of at
    least 7x7 tokens. Images of 112 px and more keep the model's default (16)."""
    side = min(img_size)
    if side >= 112:
        return default
    for p in (16, 8, 4, 2):
        if side // p >= 7 and all(s % p == 0 for s in img_size):
            return p
    return 1
