"""Visual prompt tuning around a timm VisionTransformer, without touching timm's code.

It lives in models, not adapters: a merged VPT model keeps its prompts, so loading one builds this module.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fmtransfer.errors import ConfigError


class PromptedViT(nn.Module):
    """A timm ViT with learnable prompt tokens inserted after its prefix (class) tokens.

    Shallow VPT adds ``num_tokens`` prompts at the input; deep VPT replaces them with fresh prompts before every
    block. Prompts are dropped before the final norm, so pooling sees what the plain ViT would.

    Args:
        vit: a timm ``VisionTransformer`` built with ``num_classes=0``.
        num_tokens: prompts per layer.
        deep: prompts at every block (True) or only the first (False).
        dropout: dropout on the prompts.
    """

    def __init__(self, vit: nn.Module, num_tokens: int = 10, deep: bool = True, dropout: float = 0.0):
        super().__init__()
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens"):
            if not hasattr(vit, attr):
                raise ConfigError(f"visual prompt tuning needs a timm VisionTransformer; {type(vit).__name__} has "
                                  f"no {attr!r}")
        self.vit = vit
        self.num_tokens, self.deep = int(num_tokens), bool(deep)
        self.num_features = vit.num_features
        dim = vit.embed_dim
        layers = len(vit.blocks) if deep else 1
        patch = vit.patch_embed.patch_size
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + dim))  # VPT's initialisation
        self.prompts = nn.Parameter(torch.empty(layers, self.num_tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        x = v.norm_pre(x)
        p, t, n = v.num_prefix_tokens, self.num_tokens, x.shape[0]
        for i, block in enumerate(v.blocks):
            if i == 0 or self.deep:
                prompts = self.dropout(self.prompts[i if self.deep else 0]).expand(n, -1, -1)
                rest = x[:, p:] if i == 0 else x[:, p + t:]
                x = torch.cat([x[:, :p], prompts.to(x.dtype), rest], dim=1)
            x = block(x)
        x = torch.cat([x[:, :p], x[:, p + t:]], dim=1)
        return v.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, num_features) pooled features."""
        return self.vit.forward_head(self.forward_features(x))
