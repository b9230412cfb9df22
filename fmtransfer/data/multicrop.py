"""Multi-crop views of a batch for self-supervised pretraining (DINO), on tensors of any channel count.

Each view is a random resized crop (area share and aspect ratio drawn per image), optionally flipped, with
brightness / contrast jitter, a Gaussian blur and, for RGB, a grey conversion. The images are already normalised
(``Preprocess``), so jitter works in those units and a crop never reads outside the image. Random numbers come
from the caller's CPU generator, so a run is exactly resumable, as with ``fmtransfer.data.augment``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.errors import ConfigError

_ASPECT = (3 / 4, 4 / 3)
_REFERENCE_SIDE = 224  # blur sigmas are given for 224-pixel crops, as in the DINO recipe


@dataclass(frozen=True)
class ViewSpec:
    """How one kind of view is drawn.

    Attributes:
        size: (height, width) of the view.
        scale: share of the image's area the crop covers, drawn from [low, high].
        blur: probability of a Gaussian blur (sigma 0.1-2 px at 224 px, scaled with the view's side).
        grey: probability of a grey conversion (RGB only).
    """

    size: tuple[int, int]
    scale: tuple[float, float]
    blur: float
    grey: float


class MultiCrop(nn.Module):
    """Two global views and ``n_local`` local views of every image of a batch.

    Args:
        global_size: (height, width) of the two global views.
        local_size: (height, width) of the local views.
        n_local: number of local views (0: global views only).
        global_scale: area share of a global crop, [low, high].
        local_scale: area share of a local crop, [low, high].
        hflip: probability of a horizontal flip per view.
        brightness: brightness shift drawn from [-brightness, brightness] (normalised units).
        contrast: contrast factor drawn from [1 - contrast, 1 + contrast].
    """

    def __init__(self, global_size: tuple[int, int], local_size: tuple[int, int], n_local: int,
                 global_scale: tuple[float, float], local_scale: tuple[float, float], hflip: float = 0.0,
                 brightness: float = 0.4, contrast: float = 0.4):
        super().__init__()
        for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ConfigError(f"method.dino.crops.{name}={list(scale)} must be [low, high] with "
                                  f"0 < low <= high <= 1 (a share of the image's area)")
        if n_local < 0 or not 0 <= hflip <= 1 or brightness < 0 or not 0 <= contrast < 1:
            raise ConfigError("method.dino.crops: need n_local >= 0, 0 <= hflip <= 1, brightness >= 0 and "
                              "0 <= contrast < 1")
        # DINO's recipe: one global view always blurred, the other rarely; local views half the time
        self.views = [ViewSpec(tuple(global_size), tuple(global_scale), 1.0, 0.2),
                      ViewSpec(tuple(global_size), tuple(global_scale), 0.1, 0.2),
                      *[ViewSpec(tuple(local_size), tuple(local_scale), 0.5, 0.2)] * n_local]
        self.hflip, self.brightness, self.contrast = hflip, brightness, contrast

    @property
    def n_views(self) -> int:
        return len(self.views)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                keys: list[int] | None = None) -> list[torch.Tensor]:
        """x: (N, C, H, W) normalised images -> one (N, C, h, w) tensor per view, the two global views first.

        Random numbers come from ``generator`` in batch order, or, given ``keys`` (one seed per image), from each
        image's own generator: then an image's views do not depend on its batch or on the process it went to, so
        one process and several data-parallel ones crop alike.
        """
        per_image = self._per_image_draws(keys) if keys is not None else None
        if per_image is not None and len(per_image) != x.shape[0]:
            raise ValueError(f"MultiCrop: {len(per_image)} keys for a batch of {x.shape[0]} images")
        return [self._view(x, view, generator, None if per_image is None else per_image[:, i])
                for i, view in enumerate(self.views)]

    def _per_image_draws(self, keys: list[int]) -> torch.Tensor:
        """(N, views, 10) uniform numbers: the 9 of a view's crop and jitter, then its blur sigma."""
        return torch.stack([torch.rand(self.n_views, 10, generator=torch.Generator().manual_seed(int(k)))
                            for k in keys]) if len(keys) else torch.empty(0, self.n_views, 10)

    def _view(self, x: torch.Tensor, view: ViewSpec, generator: torch.Generator | None,
              drawn: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        # drawn on the CPU: identical whatever the device
        u = torch.rand(n, 9, generator=generator) if drawn is None else drawn[:, :9]
        out = _resized_crop(x, view, u[:, :4], u[:, 4] < self.hflip)
        shift = (u[:, 5] * 2 - 1) * self.brightness
        factor = 1 + (u[:, 6] * 2 - 1) * self.contrast
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * factor.view(n, 1, 1, 1).to(out) + mean + shift.view(n, 1, 1, 1).to(out)
        if x.shape[1] == 3:
            grey = (u[:, 7] < view.grey).view(n, 1, 1, 1).to(out.device)
            out = torch.where(grey, out.mean(dim=1, keepdim=True).expand_as(out), out)
        return _blur(out, u[:, 8] < view.blur, generator, None if drawn is None else drawn[:, 9])


def _resized_crop(x: torch.Tensor, view: ViewSpec, u: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """A crop of area share in ``view.scale`` and aspect ratio in 3/4-4/3 of each image, resized to ``view.size``.

    u: (N, 4) uniform numbers (area, aspect, x, y).
    """
    area = view.scale[0] + u[:, 0] * (view.scale[1] - view.scale[0])
    log_ratio = math.log(_ASPECT[0]) + u[:, 1] * (math.log(_ASPECT[1]) - math.log(_ASPECT[0]))
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # as a share of the image side
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx, cy = (u[:, 2] * 2 - 1) * (1 - w), (u[:, 3] * 2 - 1) * (1 - h)  # the crop stays inside the image
    sign = torch.where(flip, -1.0, 1.0)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x), [x.shape[0], x.shape[1], *view.size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _blur(x: torch.Tensor, which: torch.Tensor, generator: torch.Generator | None,
          drawn: torch.Tensor | None = None) -> torch.Tensor:
    """A Gaussian blur of the images ``which`` selects, sigma drawn per image from 0.1-2 px at 224 px (from
    ``generator``, or ``drawn``: one uniform number per image of the batch)."""
    rows = torch.nonzero(which).flatten()
    if not len(rows):
        return x
    n, c, h, w = x.shape
    side = min(h, w) / _REFERENCE_SIDE
    u = torch.rand(len(rows), generator=generator) if drawn is None else drawn[rows]
    sigma = (0.1 + u * 1.9) * side
    # from the largest sigma a view may draw, not this batch's: an image's blur must not depend on its batch
    radius = max(1, math.ceil(3 * 2.0 * side))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x)  # (m, taps)
    picked = x[rows.to(x.device)].reshape(1, len(rows) * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel), applied as a separable blur
    picked = F.conv2d(F.pad(picked, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=len(k))
    picked = F.conv2d(F.pad(picked, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=len(k))
    out = x.clone()
    out[rows.to(x.device)] = picked.reshape(len(rows), c, h, w)
    return out
