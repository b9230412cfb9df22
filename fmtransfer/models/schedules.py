"""Learning-rate schedules, built from config as partials and completed with the run's step count."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.0,
                       min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to ``min_lr_ratio`` x lr."""
    total_steps = max(1, int(total_steps))
    warmup = int(round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def lightning_optimizers(params: Iterable[nn.Parameter], optimizer_factory: Callable[..., Optimizer],
                         scheduler_factory: Callable[..., Any] | None, total_steps: int) -> Any:
    """``configure_optimizers``' answer: the trainable ``params``' optimizer, and the schedule stepped every step."""
    optimizer = optimizer_factory([p for p in params if p.requires_grad])
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer, total_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
