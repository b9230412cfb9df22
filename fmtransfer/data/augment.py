"""Batch augmentation on tensors (after the batch reaches its device): cheap, and on the GPU when there is one.

Random numbers come from the generator the caller passes (``SupervisedModule`` reseeds its own every epoch),
so augmented runs stay exactly resumable.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.errors import ConfigError

Padding = Literal["border", "zeros", "reflection"]


class RandomAffine(nn.Module):
    """Random rotation, scale, translation (and optional horizontal flip) per image.

    Args:
        degrees: rotation drawn from [-degrees, degrees].
        translate: shift drawn from [-translate, translate] of the image size, per axis.
        scale: zoom factor drawn from [scale[0], scale[1]].
        hflip: probability of a horizontal flip (0 for digits and text; 0.5 for fields and tissue).
        padding: what fills pixels moved in from outside ("border" repeats the edge).
    """

    def __init__(self, degrees: float = 0.0, translate: float = 0.0, scale: tuple[float, float] = (1.0, 1.0),
                 hflip: float = 0.0, padding: Padding = "border"):
        super().__init__()
        scale = tuple(scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ConfigError(f"augment.scale={list(scale)} must be [low, high] with 0 < low <= high")
        if not 0 <= translate < 1 or degrees < 0 or not 0 <= hflip <= 1:
            raise ConfigError("augment: need 0 <= translate < 1, degrees >= 0 and 0 <= hflip <= 1")
        if padding not in ("border", "zeros", "reflection"):
            raise ConfigError(f"augment.padding={padding!r}; expected border, zeros or reflection")
        self.degrees, self.translate, self.scale, self.hflip, self.padding = degrees, translate, scale, hflip, padding

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (N, C, H, W) float -> same shape. ``generator``: a CPU generator (None: torch's global one)."""
        n = x.shape[0]
        u = torch.rand(n, 5, generator=generator)  # drawn on the CPU: identical whatever the device
        angle = (u[:, 0] * 2 - 1) * math.radians(self.degrees)
        zoom = self.scale[0] + u[:, 1] * (self.scale[1] - self.scale[0])
        tx, ty = (u[:, 2] * 2 - 1) * self.translate * 2, (u[:, 3] * 2 - 1) * self.translate * 2
        flip = torch.where(u[:, 4] < self.hflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)


class RandomResolution(nn.Module):
    """With probability ``p``, downsample an image by a random factor and upsample it back.

    Simulates coarser sensors and scanners (another ground sample distance, an older slide scanner), so a
    global model does not depend on detail a region's devices do not capture.

    Args:
        p: probability per image.
        scale: the low-resolution side as a fraction of the image side, drawn from [scale[0], scale[1]].
    """

    def __init__(self, p: float = 0.5, scale: tuple[float, float] = (0.25, 1.0)):
        super().__init__()
        scale = tuple(scale)
        if not 0 <= p <= 1 or len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"augment resolution: need 0 <= p <= 1 and 0 < scale[0] <= scale[1] <= 1, got "
                              f"p={p}, scale={list(scale)}")
        self.p, self.scale = p, scale

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        u = torch.rand(n, 2, generator=generator)
        out = x.clone()
        for i in torch.nonzero(u[:, 0] < self.p).flatten().tolist():
            f = self.scale[0] + float(u[i, 1]) * (self.scale[1] - self.scale[0])
            size = (max(1, round(h * f)), max(1, round(w * f)))
            if size == (h, w):
                continue
            small = F.interpolate(x[i:i + 1], size=size, mode="bilinear", align_corners=False, antialias=True)
            out[i:i + 1] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        return out


class Compose(nn.Module):
    """Apply transforms in order, sharing one generator."""

    def __init__(self, transforms: list[nn.Module]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator=generator)
        return x
