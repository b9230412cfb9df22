"""A JEPA-style second stage (after I-JEPA, Assran et al. 2023, written from the paper): a frozen teacher sees the
whole image; the student sees it with blocks of its token grid masked out, and a small predictor, given the
student's tokens and the masked positions, predicts the teacher's layer-normed features at those positions.

Pieces: :class:`JepaSettings` (the ``method.jepa`` config node), :func:`token_grid` / :func:`tokens` (a backbone's
token grid: a ViT's patch tokens, a CNN's last feature map), :func:`sample_block_masks` and :func:`mask_input`
(target blocks on the grid, blanked in the input), :class:`Predictor` and :class:`JepaModule` (the LightningModule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.errors import ConfigError, FmtError
from fmtransfer.models.dino import KnnMonitor, KnnSettings
from fmtransfer.models.schedules import lightning_optimizers

# fewer token positions leave no region to predict from the rest (a ResNet-18 reduces 28 px to 1x1)
MIN_TOKENS = 4


@dataclass(frozen=True)
class MaskSettings:
    """``method.jepa.mask``: the target blocks drawn on the token grid of every image.

    Attributes:
        blocks: target blocks per image (I-JEPA: 4); a block that would take the masked share over ``max_ratio``
            is skipped.
        block_scale: [low, high] share of the grid's positions each block covers.
        aspect_ratio: [low, high] height/width of a block (drawn log-uniformly).
        max_ratio: the most of the grid the blocks together may cover; the student predicts them from the rest.
    """

    blocks: int
    block_scale: list[float]
    aspect_ratio: list[float]
    max_ratio: float

    def __post_init__(self) -> None:
        if self.blocks < 1:
            raise ConfigError(f"method.jepa.mask.blocks={self.blocks} must be >= 1")
        for key in ("block_scale", "aspect_ratio"):
            value = getattr(self, key)
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ConfigError(f"method.jepa.mask.{key}={list(value)}: expected [low, high] with 0 < low <= high")
        if not 0 < self.max_ratio < 1:
            raise ConfigError(f"method.jepa.mask.max_ratio={self.max_ratio} must be in (0, 1): some of the image "
                              f"must stay visible to predict the rest from")
        if self.block_scale[1] > self.max_ratio:
            raise ConfigError(f"method.jepa.mask.block_scale={list(self.block_scale)}: a block may cover at most "
                              f"method.jepa.mask.max_ratio={self.max_ratio} of the grid")


@dataclass(frozen=True)
class PredictorSettings:
    """``method.jepa.predictor``: the transformer that predicts the teacher's tokens (discarded after training).

    Attributes:
        depth: transformer blocks. width: their width. heads: attention heads (``width`` must divide by it).
    """

    depth: int
    width: int
    heads: int

    def __post_init__(self) -> None:
        if self.depth < 1 or self.width < 1 or self.heads < 1:
            raise ConfigError(f"method.jepa.predictor: need depth, width and heads >= 1 (got {self.depth}, "
                              f"{self.width}, {self.heads})")
        if self.width % self.heads:
            raise ConfigError(f"method.jepa.predictor.width={self.width} must be a multiple of "
                              f"method.jepa.predictor.heads={self.heads}")


@dataclass(frozen=True)
class JepaSettings:
    """The ``method.jepa`` config node; defaults live in ``configs/method/jepa.yaml`` only.

    Attributes:
        teacher: the frozen teacher: a ``pretrain method=dino`` run dir, or its model.json / model.safetensors.
        init: the student's starting weights: ``teacher`` (a copy of the teacher's) or ``random``.
        loss: ``smooth_l1`` or ``mse`` between predicted and layer-normed teacher tokens at the masked positions.
        clip_grad: gradient norm clipping (0: none).
        mask, predictor: see :class:`MaskSettings`, :class:`PredictorSettings`.
        knn: the per-epoch kNN accuracy of the student on the val split (as DINO's).
    """

    teacher: str | None
    init: Literal["teacher", "random"]
    loss: Literal["smooth_l1", "mse"]
    clip_grad: float
    mask: MaskSettings
    predictor: PredictorSettings
    knn: KnnSettings

    def __post_init__(self) -> None:
        if self.clip_grad < 0:
            raise ConfigError(f"method.jepa.clip_grad={self.clip_grad} must be >= 0 (0: no clipping)")


def tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's token grid as (N, positions, dim): a ViT's patch tokens (``forward_features`` without its
    class/register tokens), a CNN's last feature map, one token per position (NCHW, or NHWC as Swin's)."""
    out = backbone.forward_features(x)
    if out.ndim == 3:
        return out[:, int(getattr(backbone, "num_prefix_tokens", 0)):]
    if out.ndim == 4:
        if out.shape[1] == int(backbone.num_features):
            return out.flatten(2).transpose(1, 2)
        return out.flatten(1, 2)
    raise ConfigError(f"{type(backbone).__name__}.forward_features gives a {out.ndim}-d tensor; JEPA needs a token "
                      f"sequence (N, L, D) or a feature map (N, C, H, W)")


def token_grid(backbone: nn.Module, image_size: list[int] | tuple[int, int], channels: int) -> tuple[int, int]:
    """(rows, cols) of the backbone's token grid for images of ``image_size``, from one dry forward pass."""
    h, w = (int(s) for s in image_size)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone.forward_features(torch.zeros(1, channels, h, w))
    finally:
        backbone.train(was_training)
    if out.ndim == 4:
        return ((out.shape[2], out.shape[3]) if out.shape[1] == int(backbone.num_features)
                else (out.shape[1], out.shape[2]))
    n = out.shape[1] - int(getattr(backbone, "num_prefix_tokens", 0))
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        if (h // ph) * (w // pw) == n:
            return h // ph, w // pw
    side = math.isqrt(n)
    if side * side == n:
        return side, side
    raise ConfigError(f"cannot lay the backbone's {n} tokens out as a grid for {h}x{w} images")


def sample_block_masks(n: int, grid: tuple[int, int], settings: MaskSettings,
                       generator: torch.Generator) -> torch.Tensor:
    """(n, rows * cols) booleans, True at the masked (target) positions: the union of up to ``settings.blocks``
    rectangles per image, at least one position masked and at least one visible."""
    h, w = grid
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    lo, hi = settings.block_scale
    log_ar = (math.log(settings.aspect_ratio[0]), math.log(settings.aspect_ratio[1]))
    draws = torch.rand(n, settings.blocks, 4, generator=generator).tolist()
    for i in range(n):
        mask = masks[i]
        for scale_u, ar_u, top_u, left_u in draws[i]:
            area = (lo + (hi - lo) * scale_u) * h * w
            ratio = math.exp(log_ar[0] + (log_ar[1] - log_ar[0]) * ar_u)
            bh = min(h, max(1, round(math.sqrt(area * ratio))))
            bw = min(w, max(1, round(math.sqrt(area / ratio))))
            top, left = int(top_u * (h - bh + 1)), int(left_u * (w - bw + 1))
            block = mask.clone()
            block[top:top + bh, left:left + bw] = True
            if block.all() or block.float().mean() > settings.max_ratio:
                continue
            mask.copy_(block)
        if not mask.any():  # every block was too large for a tiny grid: mask one position
            mask.view(-1)[int(draws[i][0][2] * h * w) % (h * w)] = True
    return masks.view(n, h * w)


def mask_input(x: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``x`` with the pixels under the masked grid positions set to 0 (the recipe's mean, once normalised)."""
    pixels = F.interpolate(mask.view(-1, 1, *grid).to(x.dtype), size=x.shape[-2:], mode="nearest")
    return x * (1 - pixels)


class Predictor(nn.Module):
    """Student tokens -> the teacher's tokens: the masked positions get a learned mask token, every position a
    learned position embedding, and a small pre-norm transformer fills the masked ones in from the rest."""

    def __init__(self, in_dim: int, out_dim: int, positions: int, settings: PredictorSettings):
        super().__init__()
        width = settings.width
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.zeros(1, positions, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(width, settings.heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, settings.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def forward(self, student_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """student_tokens: (N, L, in_dim); mask: (N, L) bools -> (N, L, out_dim) predictions."""
        z = self.embed(student_tokens)
        z = torch.where(mask[..., None], self.mask_token.to(z.dtype).expand_as(z), z) + self.position
        return self.out(self.norm(self.blocks(z)))


def jepa_loss(kind: str, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``smooth_l1`` or ``mse`` between predictions and the layer-normed teacher tokens (both (M, dim))."""
    target = F.layer_norm(target, target.shape[-1:])
    if kind == "mse":
        return F.mse_loss(predicted, target)
    return F.smooth_l1_loss(predicted, target)


class JepaModule(pl.LightningModule):
    """The student backbone and predictor trained to predict a frozen teacher's tokens at masked positions.

    Args:
        student: the student's backbone (a separate module from the teacher's; the saved model).
        teacher: the teacher's backbone; frozen here (no gradients, eval mode, never stepped).
        settings: the ``method.jepa`` settings.
        grid: the token grid of the recipe's images (the same for both: they share the architecture).
        optimizer: ``params -> Optimizer`` (a config partial). scheduler: ``(optimizer, total_steps) -> LRScheduler``.
        meta: the model header stored in checkpoints.
        knn: the per-epoch kNN accuracy of the student, when the recipe has labels.
        seed: seeds the masks, reseeded with ``seed + epoch`` at every epoch start.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, settings: JepaSettings, grid: tuple[int, int],
                 optimizer: Callable, scheduler: Callable | None = None, meta: dict[str, Any] | None = None,
                 knn: KnnMonitor | None = None, seed: int = 0):
        super().__init__()
        if student is teacher or {p.data_ptr() for p in student.parameters()} & {
                p.data_ptr() for p in teacher.parameters()}:
            raise ConfigError("JEPA's student shares tensors with the frozen teacher; it must be a separate copy")
        self.settings, self.grid, self.knn, self.seed = settings, tuple(grid), knn, seed
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.meta = meta or {}
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.predictor = Predictor(int(student.num_features), int(teacher.num_features), grid[0] * grid[1],
                                   settings.predictor)
        self.history: list[dict[str, float]] = []
        # the teacher's kNN accuracy on the val split: the baseline the student must beat
        self.initial_knn: float | None = None
        self._steps: list[dict[str, float]] = []
        self._generator = torch.Generator()

    def train(self, mode: bool = True) -> JepaModule:
        super().train(mode)
        self.teacher.eval()  # frozen: its BatchNorm statistics stay as trained, whatever Lightning switches
        return self

    def on_train_start(self) -> None:
        if self.knn is None or self.initial_knn is not None or self.global_step > 0:
            return  # a resumed run keeps the baseline its checkpoint recorded
        accuracy = self.knn.accuracy(self.teacher, self.device) if self.trainer.is_global_zero else 0.0
        self.initial_knn = float(self.trainer.strategy.broadcast(accuracy, src=0))

    def on_train_epoch_start(self) -> None:
        self._generator.manual_seed(self.seed + self.current_epoch)
        self._steps = []

    def training_step(self, batch, batch_idx):
        x = batch[0]
        mask = sample_block_masks(len(x), self.grid, self.settings.mask, self._generator).to(x.device)
        with torch.no_grad():
            target = tokens(self.teacher, x)
        predicted = self.predictor(tokens(self.student, mask_input(x, mask, self.grid)), mask)
        loss = jepa_loss(self.settings.loss, predicted[mask], target[mask])
        if not torch.isfinite(loss):
            raise FmtError(f"JEPA stopped at epoch {self.current_epoch + 1}, step {self.global_step + 1}: "
                                     f"the loss is {loss.item()}; lower method.optimizer.lr")
        self._steps.append({"loss": float(loss.detach()), "mask_ratio": float(mask.float().mean())})
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        value = gradient_clip_val or self.settings.clip_grad
        if value:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm="norm")

    def on_train_epoch_end(self) -> None:
        if not self._steps:
            return
        record = {k: float(np.mean([s[k] for s in self._steps])) for k in self._steps[0]}
        record.update(epoch=self.current_epoch + 1, steps=len(self._steps))
        if self.knn is not None:
            accuracy = self.knn.accuracy(self.student, self.device) if self.trainer.is_global_zero else 0.0
            record["knn_val_accuracy"] = float(self.trainer.strategy.broadcast(accuracy, src=0))
            self.log("val/knn_acc", record["knn_val_accuracy"], prog_bar=True)
        self.history.append(record)

    def configure_optimizers(self):
        params = [*self.student.parameters(), *self.predictor.parameters()]
        return lightning_optimizers(params, self.optimizer_factory, self.scheduler_factory,
                                    self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fmtransfer"] = self.meta
        checkpoint["jepa_history"] = self.history
        checkpoint["jepa_initial_knn"] = self.initial_knn
        # the teacher is read from its own file on resume (its sha256 is in the run's setup): not stored twice
        for key in [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("jepa_history", []))
        self.initial_knn = checkpoint.get("jepa_initial_knn")
        state = checkpoint["state_dict"]
        state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
