"""Preprocessing that belongs to a model: size, channels, normalisation.

A model records its :class:`Preprocess` (in model.json, later in ONNX metadata), so evaluation and serving
feed it images exactly as it was trained on, whatever recipe they come from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fmtransfer.data.images import convert_channels


@dataclass(frozen=True)
class Preprocess:
    """Resize to ``image_size`` (H, W), convert to ``channels``, then ``(x - mean) / std`` per channel."""

    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_recipe(cls, recipe) -> Preprocess:
        return cls(tuple(recipe.image_size), int(recipe.channels), tuple(recipe.mean), tuple(recipe.std))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(tuple(d["image_size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float32."""
        if tuple(x.shape[-2:]) == tuple(self.image_size):
            return x
        return F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)

    def image(self, hwc: np.ndarray) -> torch.Tensor:
        """One ``(H, W, C)`` float image in [0, 1] -> ``(channels, *image_size)`` normalised tensor."""
        x = torch.from_numpy(np.ascontiguousarray(convert_channels(hwc, self.channels))).permute(2, 0, 1)
        return self._normalize(self._resize(x.unsqueeze(0).float())[0])

    def batch(self, nhwc: np.ndarray, chunk: int = 4096) -> torch.Tensor:
        """``(N, H, W, C)`` float images in [0, 1] -> ``(N, channels, *image_size)``, in bounded chunks."""
        out = torch.empty((len(nhwc), self.channels, *self.image_size), dtype=torch.float32)
        for start in range(0, len(nhwc), chunk):
            part = convert_channels(nhwc[start:start + chunk], self.channels)
            x = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)).permute(0, 3, 1, 2)
            out[start:start + chunk] = self._normalize(self._resize(x))
        return out
