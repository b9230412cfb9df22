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
        lora_targets: regex (full match) over backbone module names that LoRA adapts by default; None adapts
            every Linear and Conv2d layer.
        prompts: visual prompt tuning applies (a timm VisionTransformer with ``blocks`` and ``_pos_embed``).
        int8: the INT8 mode ``export.quantize=auto`` picks: ``static`` (QDQ) for convolutional nets, ``dynamic``
            for transformers, whose activations (softmax, GELU, LayerNorm) lose accuracy under static ranges.
        signature: regex (full match) over state-dict keys that only this family's checkpoints have; it names
            the family of a checkpoint that does not fit the model it was given to.
        blocks: regex (full match) over backbone module names of its repeated blocks, in network order; the last
            match is the block regional pretraining unfreezes (``regional_pretrain.trainable=last_block``).
        zero_init_last: the constructor takes ``zero_init_last`` (timm zeroes each residual branch's last norm, so
            a new network is its shortcut path alone: at small image sizes that path reads one corner pixel, and
            every image gets the same features until training grows the branches).
    """

    name: str
    pattern: str
    takes_img_size: bool = False
    takes_patch_size: bool = False
    lora_targets: str | None = None
    prompts: bool = False
    int8: str = "static"
    signature: str | None = None
    blocks: str | None = None
    zero_init_last: bool = False

    def matches(self, model_name: str) -> bool:
        return re.match(self.pattern, model_name) is not None


FAMILIES: tuple[Family, ...] = (
    Family("vit", r"^(vit_|deit|test_vit|eva|beit|flexivit|samvit)", takes_img_size=True, takes_patch_size=True,
           lora_targets=r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))", prompts=True, int8="dynamic",
           signature=r"blocks\.\d+\.attn\.qkv\.weight", blocks=r"blocks\.\d+"),
    Family("swin", r"^(swin|test_swin)", takes_img_size=True, int8="dynamic",
           lora_targets=r"layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
           signature=r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table",
           blocks=r"layers\.\d+\.blocks\.\d+"),
    Family("convnext", r"^(convnext|test_convnext)",
           lora_targets=r"stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.fc1|mlp\.fc2)",
           signature=r"stages\.\d+\.blocks\.\d+\.conv_dw\.weight", blocks=r"stages\.\d+\.blocks\.\d+"),
    Family("resnet", r"^(resnet|resnext|wide_resnet|seresnet|test_resnet|resnetrs)",
           lora_targets=r"(conv1(\.\d+)?|layer\d+\.\d+\.(conv\d+|downsample\.\d+))",  # only convs are taken
           signature=r"layer\d+\.\d+\.conv\d\.weight", blocks=r"layer\d+\.\d+", zero_init_last=True),
    Family("efficientnet", r"^(efficientnet|tf_efficientnet|mobilenet|test_efficientnet)",
           lora_targets=r"(conv_stem|blocks\.\d+\.\d+\.(conv_dw|conv_pw|conv_pwl|conv)|conv_head)",
           signature=r"blocks\.\d+\.\d+\.conv_(dw|pw)\.weight", blocks=r"blocks\.\d+\.\d+"),
)
GENERIC = Family("generic", r".*")


def architecture_name(model_name: str) -> str:
    """The architecture part of a timm name: ``hf-hub:timm/vit_small_patch14_dinov2.lvd142m`` ->
    ``vit_small_patch14_dinov2.lvd142m`` (a hub repository named after its architecture, as timm's are)."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return model_name.split(":", 1)[1].rstrip("/").rsplit("/", 1)[-1]
    return model_name


def family_of(model_name: str) -> Family:
    """The family of a timm model name or hub id (``generic`` when none matches)."""
    name = architecture_name(model_name)
    for family in FAMILIES:
        if family.matches(name):
            return family
    return GENERIC


def family_of_keys(keys) -> Family | None:
    """The family whose signature a checkpoint's state-dict keys carry, or None."""
    keys = list(keys)
    for family in FAMILIES:
        if family.signature and any(re.fullmatch(family.signature, k) for k in keys):
            return family
    return None


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
