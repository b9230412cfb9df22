"""BatchNorm over the global batch of a data-parallel run, on any device (``trainer=ddp``).

torch's :class:`~torch.nn.SyncBatchNorm` refuses CPU tensors (and DDP refuses SyncBatchNorm layers in a CPU
model), so ``Trainer(sync_batchnorm=True)`` fails as soon as a BatchNorm backbone trains under DDP on CPUs (gloo).
Without syncing, each process normalises by the statistics of its own share of the batch, and a 2-process run
trains another model than one process on the same global batch. :class:`SyncBatchNormAnyDevice` is a Lightning
layer-sync plugin that turns BatchNorm layers into :class:`GlobalBatchNorm`: the mean and variance of the global
batch from differentiable all-reduces (``torch.distributed.nn.functional.all_reduce``, gloo or NCCL), so the
gradient flows across processes as SyncBatchNorm's does.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from pytorch_lightning.plugins.layer_sync import LayerSync
from torch import nn

log = logging.getLogger(__name__)

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch of a data-parallel run (any input
    rank >= 2; outside a run of several processes, and in eval mode, plain BatchNorm)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's argument name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's argument name
        if not self._synced(input):
            return super().forward(input)
        self._check_input_dim(input)
        dtype = input.dtype
        input = input.float()  # noqa: A001 - statistics in float32 under bf16 autocast too
        dims = [0, *range(2, input.dim())]
        count = input.new_tensor([input.numel() / input.shape[1]])
        # two passes (mean, then squared deviations): a sum of squares cancels badly in float32
        total = dist_nn.all_reduce(torch.cat([input.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = input - mean.view(shape)
        var = dist_nn.all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), float(n))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(dtype)

    def _synced(self, input: torch.Tensor) -> bool:
        batch_stats = self.training or self.running_mean is None
        return batch_stats and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """As BatchNorm: the unbiased variance; ``momentum=None`` is a cumulative average."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean), alpha=factor)
        self.running_var.mul_(1 - factor).add_((var * (n / max(n - 1, 1.0))).to(self.running_var), alpha=factor)


class SyncBatchNormAnyDevice(LayerSync):
    """Lightning layer-sync plugin (``Trainer(plugins=[...])``, used by ``configs/trainer/ddp.yaml`` in place of
    ``sync_batchnorm=true``): every plain BatchNorm layer normalises by the global batch, on GPUs and CPUs alike.

    The layers keep their state (the class is swapped in place), and ``revert``, which Lightning calls when
    training ends, gives them back their own class. BatchNorm subclasses with more in their forward (timm's
    BatchNormAct2d) are left as they are, with a warning.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        others = sorted({type(m).__name__ for m in model.modules()
                         if isinstance(m, _PLAIN) and type(m) not in (*_PLAIN, GlobalBatchNorm)})
        if others:
            log.warning("trainer=ddp: %s layers normalise by each process's own batch (only plain BatchNorm "
                        "layers are synced across processes)", ", ".join(others))
        for module in model.modules():
            if type(module) in _PLAIN:
                module._unsynced_class = type(module)
                module.__class__ = GlobalBatchNorm
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if type(module) is GlobalBatchNorm:
                module.__class__ = module.__dict__.pop("_unsynced_class")
        return model
