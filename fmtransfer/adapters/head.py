"""The head for a region: the region's own label set, initialised from the global head where classes agree."""

from __future__ import annotations

import torch
from torch import nn


def region_head(base_head: nn.Module, base_classes: list[str] | None, region_classes: list[str] | None,
                reuse: bool = True) -> tuple[nn.Linear, str]:
    """Build a head with one output per region class (one for regression).

    Rows of classes the global head knows are copied from it (when ``reuse``); new classes start fresh. A base
    without a head (``base_head.out_features`` 0) gets a new one.
    Returns the head and a note saying what was reused.
    """
    outputs = len(region_classes) if region_classes is not None else 1
    head = nn.Linear(base_head.in_features, outputs)
    if base_head.out_features == 0:  # a head-less base (a self-supervised backbone): nothing to reuse
        return head, "new head (the base has none: a self-supervised backbone)"
    if not reuse:
        return head, "new head (random init)"
    if region_classes is None:  # regression: one output either way
        head.load_state_dict(base_head.state_dict())
        return head, "global head"
    index = {c: i for i, c in enumerate(base_classes or [])}
    shared = [(j, index[c]) for j, c in enumerate(region_classes) if c in index]
    with torch.no_grad():
        for j, i in shared:
            head.weight[j] = base_head.weight[i]
            head.bias[j] = base_head.bias[i]
    if len(shared) == outputs and outputs == base_head.out_features:
        return head, "global head (same classes)"
    return head, f"new head: {len(shared)} of {outputs} classes initialised from the global head"
