"""Self-supervised DINO pretraining (Caron et al. 2021, written from the paper): a student network learns to
match an exponential-moving-average teacher across multi-crop views of unlabelled images.

Pieces: :class:`DinoSettings` (the ``method.dino`` config node), :class:`DinoHead` (MLP, L2-normalised
bottleneck, prototypes), :class:`DinoLoss` (cross-entropy between sharpened, centred teacher and student
distributions; the collapse signals come from the same numbers), :class:`CollapseGuard` (stops a collapsed run
with the signal and the settings to change) and :class:`DinoModule` (the LightningModule).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from fmtransfer.data.multicrop import MultiCrop
from fmtransfer.errors import ConfigError, FmtError
from fmtransfer.models.inference import with_measured_norms
from fmtransfer.models.probes import knn_scores
from fmtransfer.models.schedules import lightning_optimizers

log = logging.getLogger(__name__)


class CollapseError(FmtError):
    """DINO training collapsed; the message names the signal, its values and the settings to change.

    Attributes:
        signal: ``uniform``, ``constant``, ``embedding`` or ``not_finite``.
    """

    def __init__(self, message: str, signal: str):
        super().__init__(message)
        self.signal = signal


# n_local=auto: DINO's 6 local views when a local view is at least MIN_LOCAL_SIDE px a side (images of 75 px and up
# with local_size=auto), none below
AUTO_LOCAL_VIEWS = 6
MIN_LOCAL_SIDE = 32
LOCAL_SHARE = 3 / 7  # local_size=auto: this share of the image side (DINO's 96 of 224 px)


@dataclass(frozen=True)
class CropSettings:
    """``method.dino.crops``: multi-crop views (see :class:`fmtransfer.data.multicrop.MultiCrop`).

    Attributes:
        n_local: local views per image (0: the two global views only), or ``auto``: 6 (DINO's 2 + 6) when a local view
            has at least ``MIN_LOCAL_SIDE`` pixels a side, else 0. On 28 px digits a local view is 12 px, and a
            ResNet-18 reduces it to almost nothing: six of them kept the loss at ln K on mnist_global and
            uci_digits_region, where two global views alone learned (see the README).
        global_size: side of the global views in pixels, or ``auto``: the recipe's image size.
        local_size: side of the local views, or ``auto``: 3/7 of the image side (96 px of 224, as DINO),
            rounded to a multiple of a ViT's patch size.
        global_scale: area share of a global crop, or ``auto``: [0.4, 1] with local views, [0.14, 1] without
            (the DINO authors' advice when there are no local crops).
        local_scale: area share of a local crop.
        hflip: probability of a horizontal flip (0 for digits and text; 0.5 for fields, tissue, photos).
        brightness, contrast: photometric jitter (normalised units; contrast factor 1 +- contrast).
    """

    n_local: Any
    global_size: Any
    local_size: Any
    global_scale: Any
    local_scale: list[float]
    hflip: float
    brightness: float
    contrast: float

    def __post_init__(self) -> None:
        for key in ("global_size", "local_size"):
            value = getattr(self, key)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"method.dino.crops.{key}={value!r}: expected auto or a positive number of pixels")
        if self.global_scale != "auto" and (not isinstance(self.global_scale, (list, tuple)) or len(self.global_scale) != 2):
            raise ConfigError(f"method.dino.crops.global_scale={self.global_scale!r}: expected auto or [low, high]")
        if self.n_local != "auto" and (isinstance(self.n_local, bool) or not isinstance(self.n_local, int)
                                       or self.n_local < 0):
            raise ConfigError(f"method.dino.crops.n_local={self.n_local!r}: expected auto or a number >= 0")

    def local_views(self, image_size: list[int]) -> int:
        """How many local views an image of ``image_size`` gets (``auto`` resolved)."""
        if self.n_local != "auto":
            return int(self.n_local)
        side = min(int(s) for s in image_size) * LOCAL_SHARE if self.local_size == "auto" else int(self.local_size)
        return AUTO_LOCAL_VIEWS if side >= MIN_LOCAL_SIDE else 0


@dataclass(frozen=True)
class CollapseSettings:
    """``method.dino.collapse``: when a run counts as collapsed (see :class:`CollapseGuard`).

    Attributes:
        stop: stop a collapsed run with an error (false: record the signals only).
        patience: steps in a row a signal must stay in its collapsed range (an epoch with fewer steps counts
            when all of its steps were).
        max_entropy_fraction: uniform collapse when the teacher's entropy exceeds this share of ln(prototypes).
        min_loss_fraction: constant output when the loss falls below this share of ln(prototypes).
        min_std_ratio: embedding collapse when the std of the L2-normalised embeddings falls below this share of
            the healthy 1/sqrt(d).
        min_prototypes_share: a partial collapse, warned about at an epoch's end and never stopped: the teacher
            spreads a batch over fewer than this share of the prototypes it could reach (0: no warning).
    """

    stop: bool
    patience: int
    max_entropy_fraction: float
    min_loss_fraction: float
    min_std_ratio: float
    min_prototypes_share: float

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ConfigError(f"method.dino.collapse.patience={self.patience} must be >= 1")
        for key in ("max_entropy_fraction", "min_loss_fraction", "min_std_ratio", "min_prototypes_share"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"method.dino.collapse.{key}={getattr(self, key)} must be in [0, 1]")


@dataclass(frozen=True)
class KnnSettings:
    """``method.dino.knn``: the kNN accuracy logged every epoch on a labelled recipe's val split.

    Attributes:
        k: neighbours that vote. temperature: vote weight exp(cosine / temperature).
        max_bank: at most this many train images form the bank (a seeded sample), to bound the cost per epoch.
    """

    k: int
    temperature: float
    max_bank: int


@dataclass(frozen=True)
class DinoSettings:
    """The ``method.dino`` config node; defaults live in ``configs/method/dino.yaml`` only.

    Attributes:
        prototypes: K, the width of the head's last layer (the loss of a uniform teacher is ln K).
        hidden_dim, bottleneck_dim: the projection MLP's widths.
        head_batch_norm: BatchNorm after the head's hidden layers. A CNN's pooled ReLU features are nearly alike
            for every image at initialisation, so after centring the teacher starts (and stays) near uniform without
            it; DINO's ViTs train without.
        student_temp: the student's softmax temperature.
        teacher_temp_start, teacher_temp: the teacher's temperature warms linearly from the first to the second
            over ``teacher_temp_warmup`` (a share of the training steps), then stays.
        center_momentum: momentum of the centre (running mean of the teacher's outputs).
        momentum_start, momentum_end: the teacher's EMA momentum, on a cosine schedule over the training steps.
        freeze_last_layer_epochs: the prototypes stay fixed for this many first epochs.
        clip_grad: gradient norm clipping (0: none).
        min_batch_size: smallest batch the centre may be estimated from.
        crops, collapse, knn: see :class:`CropSettings`, :class:`CollapseSettings`, :class:`KnnSettings`.
    """

    prototypes: int
    hidden_dim: int
    bottleneck_dim: int
    head_batch_norm: bool
    student_temp: float
    teacher_temp_start: float
    teacher_temp: float
    teacher_temp_warmup: float
    center_momentum: float
    momentum_start: float
    momentum_end: float
    freeze_last_layer_epochs: int
    clip_grad: float
    min_batch_size: int
    crops: CropSettings
    collapse: CollapseSettings
    knn: KnnSettings

    def __post_init__(self) -> None:
        if self.prototypes < 2 or self.hidden_dim < 1 or self.bottleneck_dim < 1:
            raise ConfigError("method.dino: need prototypes >= 2, hidden_dim >= 1 and bottleneck_dim >= 1")
        for key in ("student_temp", "teacher_temp_start", "teacher_temp"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.dino.{key}={getattr(self, key)} must be > 0")
        for key in ("teacher_temp_warmup", "center_momentum", "momentum_start", "momentum_end"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"method.dino.{key}={getattr(self, key)} must be in [0, 1]")
        if self.momentum_end < self.momentum_start:
            raise ConfigError(f"method.dino.momentum_end={self.momentum_end} must be >= momentum_start="
                              f"{self.momentum_start} (the teacher's EMA momentum rises towards 1)")
        if self.min_batch_size < 2:
            raise ConfigError(f"method.dino.min_batch_size={self.min_batch_size} must be >= 2")

    def teacher_temperature(self, progress: float) -> float:
        """The teacher's temperature at ``progress`` (share of the training steps done)."""
        if self.teacher_temp_warmup <= 0 or progress >= self.teacher_temp_warmup:
            return self.teacher_temp
        return self.teacher_temp_start + (self.teacher_temp - self.teacher_temp_start) * progress / self.teacher_temp_warmup

    def momentum(self, progress: float) -> float:
        """The teacher's EMA momentum at ``progress``: cosine from ``momentum_start`` to ``momentum_end``."""
        return self.momentum_end - (self.momentum_end - self.momentum_start) * (math.cos(math.pi * min(1.0, progress)) + 1) / 2


@dataclass(frozen=True)
class CropPlan:
    """Crop sizes, scales and the number of local views resolved for one recipe and backbone."""

    global_size: tuple[int, int]
    local_size: tuple[int, int]
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    n_local: int

    def build(self, crops: CropSettings) -> MultiCrop:
        return MultiCrop(self.global_size, self.local_size, self.n_local, self.global_scale, self.local_scale,
                         hflip=crops.hflip, brightness=crops.brightness, contrast=crops.contrast)


def plan_crops(crops: CropSettings, image_size: list[int], patch: int | None) -> CropPlan:
    """Resolve ``auto`` crop sizes and scales for the recipe's ``image_size`` and a ViT's ``patch`` size.

    Raises:
        ConfigError: a crop size that is not a multiple of the patch size, or larger than the image.
    """
    h, w = (int(s) for s in image_size)
    unit = patch or 1

    def side(value: int | str, share: float, key: str) -> tuple[int, int]:
        if value == "auto":
            return tuple(max(unit, int(round(s * share / unit)) * unit) for s in (h, w))  # type: ignore[return-value]
        size = int(value)
        if size < 1:
            raise ConfigError(f"method.dino.crops.{key}={value} must be a positive number of pixels or auto")
        if patch and size % patch:
            lower, upper = max(patch, size // patch * patch), (size // patch + 1) * patch
            raise ConfigError(f"method.dino.crops.{key}={size} does not fit the backbone's patch size {patch}: crop "
                              f"sides must be multiples of it (e.g. {lower} or {upper})")
        return (size, size)

    global_size = (h, w) if crops.global_size == "auto" else side(crops.global_size, 1.0, "global_size")
    if patch and (h % patch or w % patch) and crops.global_size == "auto":
        raise ConfigError(f"data.image_size={[h, w]} does not fit the backbone's patch size {patch}; set "
                          f"method.dino.crops.global_size to a multiple of {patch}")
    local_size = side(crops.local_size, LOCAL_SHARE, "local_size")
    n_local = crops.local_views([h, w])
    if crops.global_scale == "auto":
        global_scale = (0.4, 1.0) if n_local else (0.14, 1.0)
    else:
        global_scale = tuple(float(v) for v in crops.global_scale)
    if n_local and (local_size[0] > global_size[0] or local_size[1] > global_size[1]):
        raise ConfigError(f"method.dino.crops.local_size={list(local_size)} is larger than the global views "
                          f"{list(global_size)}; local views are the small ones")
    return CropPlan(global_size, local_size, global_scale, tuple(float(v) for v in crops.local_scale), n_local)


class DinoHead(nn.Module):
    """Projection head: MLP -> L2-normalised bottleneck -> cosine against ``prototypes`` unit vectors.

    The last layer is a weight-normalised linear layer with its norm fixed at 1 (DINO's ``norm_last_layer``):
    each output is the cosine between the bottleneck and one prototype. ``batch_norm`` puts BatchNorm after the
    hidden layers (DINO's ``use_bn_in_head``).
    """

    def __init__(self, in_dim: int, prototypes: int, hidden_dim: int, bottleneck_dim: int, batch_norm: bool = False):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if batch_norm else nn.Identity
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), norm(), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 norm(), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck_dim) / math.sqrt(bottleneck_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_dim) -> (N, prototypes) cosines."""
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


class DinoLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over every pair of different views.

    The centre is a buffer (saved in checkpoints): a running mean of the teacher's outputs with momentum
    ``center_momentum``, averaged over processes under DDP.
    """

    def __init__(self, prototypes: int, student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, prototypes))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor],
                teacher_temp: float) -> tuple[torch.Tensor, dict[str, float]]:
        """student: one (N, K) output per view (the global views first); teacher: one per global view.

        Returns:
            the loss and the signals: ``teacher_entropy`` (mean entropy of the teacher's distributions),
            ``teacher_mean_entropy`` (entropy of their batch mean: low when one prototype takes every image) and
            ``kl`` (KL(teacher || student), the loss minus the teacher's entropy) and ``teacher_outputs`` (the
            teacher's distributions in the global batch: two per image).
        """
        # in float32 whatever the trainer's precision: at temperature 0.04 bf16's 8-bit mantissa turns the
        # sharpened softmax into a near one-hot of rounding noise
        with torch.autocast(device_type=student[0].device.type, enabled=False):
            probs = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1) for t in teacher]
            log_student = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
            total, pairs = student[0].new_zeros((), dtype=torch.float32), 0
            for i, p in enumerate(probs):
                for j, log_q in enumerate(log_student):
                    if i == j:  # a view is never its own target
                        continue
                    total = total + torch.sum(-p * log_q, dim=-1).mean()
                    pairs += 1
            loss = total / pairs
        return loss, self._signals(loss, torch.cat(probs))

    @staticmethod
    @torch.no_grad()
    def _signals(loss: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
        """The signals over the global batch (every process of a data-parallel run gets the same numbers, so the
        collapse guard stops all of them at the same step): each process's batch is the same size (Lightning's
        DistributedSampler pads), so means over processes are means over the global batch."""
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
        local = torch.cat([loss.detach().float().view(1), entropy.view(1), probs.mean(0)])
        merged = all_reduce_mean(local)
        mean = merged[2:]
        mean_entropy = float(-(mean * torch.log(mean.clamp_min(1e-12))).sum())
        loss_all, entropy_all = float(merged[0]), float(merged[1])
        # a batch mean of n near one-hot distributions spreads over at most n prototypes
        outputs = float(probs.shape[0] * distributed_world())
        return {"loss": loss_all, "teacher_entropy": entropy_all, "teacher_mean_entropy": mean_entropy,
                "kl": loss_all - entropy_all, "teacher_outputs": outputs}

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """teacher: (N, K) raw teacher outputs of this step."""
        batch_mean = all_reduce_mean(teacher.float().mean(0, keepdim=True))  # every process keeps one centre
        self.center.mul_(self.center_momentum).add_(batch_mean * (1 - self.center_momentum))


def distributed_world() -> int:
    """Processes of the running data-parallel job (1 outside one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the processes of a data-parallel run (``x`` itself in a single process)."""
    if distributed_world() > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over the processes of a data-parallel run (``x`` itself in a single process)."""
    return all_reduce_sum(x) / distributed_world()


@torch.no_grad()
def embedding_std(features: torch.Tensor) -> float:
    """Std over the (global) batch of L2-normalised features, averaged over dimensions (healthy ~1/sqrt(d),
    collapsed 0).

    features: (N, d), this process's share of the batch.
    """
    z = F.normalize(features.detach().float(), dim=-1).double()
    n = z.new_tensor([z.shape[0]])
    total = all_reduce_sum(torch.cat([z.sum(0), (z * z).sum(0), n]))
    d = z.shape[1]
    count = total[-1]
    var = (total[d:2 * d] - total[:d] ** 2 / count) / (count - 1).clamp_min(1)
    return float(var.clamp_min(0).sqrt().mean())


_ADVICE = {
    "uniform": "The teacher does not sharpen: lower method.dino.teacher_temp and method.dino.teacher_temp_start "
               "(0.04, or 0.02 on small data), or lower method.optimizer.lr; check that the teacher is an EMA copy "
               "(method.dino.momentum_start < 1)",
    "constant": "One prototype takes every image (centring loses to sharpening): lower method.dino.center_momentum "
                "(0.9), raise method.dino.teacher_temp, lower method.optimizer.lr or raise loader.batch_size",
    "embedding": "The backbone gives every image the same embedding: lower method.optimizer.lr, raise "
                 "loader.batch_size, or make the two views of an image differ more: widen "
                 "method.dino.crops.global_scale (e.g. [0.14,1])",
    "not_finite": "The loss is not a finite number: lower method.optimizer.lr or method.dino.clip_grad",
    "spread": "raise method.dino.teacher_temp, lower method.dino.center_momentum, raise loader.batch_size or lower "
              "method.dino.prototypes",
}


def embedding_advice(crops: MultiCrop | None) -> str:
    """The advice for an embedding collapse, for the run's views: local views are worth adding only where they keep
    ``MIN_LOCAL_SIDE`` pixels a side (12 px local views of 28 px digits kept DINO from learning at all)."""
    advice = _ADVICE["embedding"]
    if crops is None:
        return advice
    side = min(crops.views[0].size)
    local = crops.views[2:]
    local_side = min(local[0].size) if local else round(side * LOCAL_SHARE)
    if local_side >= MIN_LOCAL_SIDE:
        return advice + (", or widen method.dino.crops.local_scale" if local else
                         f", or add local views (method.dino.crops.n_local=6: {local_side} px a side at {side} px)")
    if local:
        return advice + (f"; and drop the local views (method.dino.crops.n_local=0): at {local_side} px a side, under "
                         f"{MIN_LOCAL_SIDE}, they are too small to learn from")
    return advice + (f", or raise method.dino.crops.brightness and contrast; local views would not help at {side} px "
                     f"(they would be {local_side} px a side, under {MIN_LOCAL_SIDE}: keep method.dino.crops.n_local=0)")


@dataclass
class CollapseGuard:
    """Watches every step's signals; a signal that stays in its collapsed range for ``patience`` steps in a row
    (or for all the steps of an epoch) is a collapse.

    Signals (``ln K`` = ln(prototypes), ``d`` = embedding dimension):
        uniform: the teacher's entropy above ``max_entropy_fraction`` x ln K (the loss then sits at ln K);
        constant: the loss below ``min_loss_fraction`` x ln K (every image goes to one prototype);
        embedding: the std of L2-normalised embeddings below ``min_std_ratio`` / sqrt(d).
    """

    settings: CollapseSettings
    prototypes: int
    embed_dim: int
    crops: MultiCrop | None = None  # the run's views, which the embedding advice depends on
    streak: dict[str, int] = field(default_factory=dict)
    epoch_steps: int = 0
    epoch_collapsed: dict[str, int] = field(default_factory=dict)

    @property
    def ln_k(self) -> float:
        return math.log(self.prototypes)

    def collapsed(self, s: dict[str, float]) -> dict[str, bool]:
        c = self.settings
        return {"uniform": s["teacher_entropy"] > c.max_entropy_fraction * self.ln_k,
                "constant": s["loss"] < c.min_loss_fraction * self.ln_k,
                "embedding": s["embedding_std"] < c.min_std_ratio / math.sqrt(self.embed_dim)}

    def step(self, s: dict[str, float], where: str) -> None:
        """Record one step's signals; raises :class:`CollapseError` (when ``stop``) at ``patience`` steps."""
        if not math.isfinite(s["loss"]):
            raise CollapseError(f"DINO stopped at {where}: the loss is {s['loss']}. {_ADVICE['not_finite']}",
                                "not_finite")
        self.epoch_steps += 1
        for name, bad in self.collapsed(s).items():
            self.streak[name] = self.streak.get(name, 0) + 1 if bad else 0
            self.epoch_collapsed[name] = self.epoch_collapsed.get(name, 0) + int(bad)
            if self.settings.stop and self.streak[name] >= self.settings.patience:
                self._raise(name, s, where, f"{self.streak[name]} steps in a row")

    def end_epoch(self, record: dict[str, float], where: str) -> None:
        """At an epoch's end: a signal collapsed at every step of a short epoch stops the run too."""
        steps, self.epoch_steps = self.epoch_steps, 0
        counts, self.epoch_collapsed = self.epoch_collapsed, {}
        if not self.settings.stop or not steps:
            return
        for name, count in counts.items():
            if count == steps:
                self._raise(name, record, where, f"every step of the epoch ({steps})")

    def spread(self, record: dict[str, float], where: str) -> str | None:
        """The partial-collapse warning for an epoch's ``record`` (None when the teacher spreads its batches wide
        enough): ``prototypes_in_use`` against ``prototypes_reachable``, min(K, the teacher's outputs in a batch)."""
        share = self.settings.min_prototypes_share
        reachable = record["prototypes_reachable"]
        if record["prototypes_in_use"] >= share * reachable:
            return None
        return (f"DINO at {where}: the teacher spreads a batch over {record['prototypes_in_use']:.1f} prototypes, "
                f"under {share:g} of the {reachable:.0f} it could reach (min(method.dino.prototypes={self.prototypes}, "
                f"{record['teacher_outputs']:.0f} teacher outputs a batch)): a partial collapse, which does not stop "
                f"the run. To spread it: {_ADVICE['spread']}; method.dino.collapse.min_prototypes_share sets this "
                f"warning (0: off)")

    def _raise(self, name: str, s: dict[str, float], where: str, how_long: str) -> None:
        healthy = 1 / math.sqrt(self.embed_dim)
        value = {
            "uniform": f"the teacher's entropy {s['teacher_entropy']:.3f} is at ln({self.prototypes}) = "
                       f"{self.ln_k:.3f} (loss {s['loss']:.3f}): uniform collapse",
            "constant": f"the loss {s['loss']:.4f} is near 0 (ln({self.prototypes}) = {self.ln_k:.3f}; teacher "
                        f"entropy {s['teacher_entropy']:.3f}, KL {s['kl']:.4f}): constant output",
            "embedding": f"the std of the L2-normalised embeddings is {s['embedding_std']:.2e} (healthy about "
                         f"1/sqrt({self.embed_dim}) = {healthy:.3f}): the embeddings collapsed",
        }[name]
        advice = embedding_advice(self.crops) if name == "embedding" else _ADVICE[name]
        raise CollapseError(f"DINO collapsed at {where}: {value}, for {how_long}. {advice} "
                            f"(method.dino.collapse.stop=false records the signals without stopping)", name)


class KnnMonitor:
    """The kNN accuracy of the teacher's embeddings on the val split (bank: the train split), once per epoch.

    Args:
        bank_loader, val_loader: ``() -> DataLoader`` of ``(x, target, row)`` batches, unshuffled.
        num_classes: classes of the recipe.
    """

    def __init__(self, bank_loader: Callable, val_loader: Callable, num_classes: int, settings: KnnSettings):
        self.bank_loader, self.val_loader = bank_loader, val_loader
        self.num_classes, self.settings = num_classes, settings

    def _bank(self, loader: DataLoader) -> DataLoader:
        """At most ``max_bank`` train images, drawn with a fixed seed (the same bank every epoch); the first ones
        would do only for a shuffled table, and a recipe stored class by class then banks one class."""
        n = len(loader.dataset)
        if n <= self.settings.max_bank:
            return loader
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:self.settings.max_bank].sort().values
        return DataLoader(Subset(loader.dataset, rows.tolist()), batch_size=loader.batch_size,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn)

    @torch.no_grad()
    def _embed(self, backbone: nn.Module, loader, device):
        feats, labels = [], []
        for x, y, _ in loader:
            feats.append(backbone(x.to(device)).float().cpu())
            labels.append(y)
        return torch.cat(feats).numpy(), torch.cat(labels).numpy()

    def starting_accuracy(self, backbone: nn.Module, device) -> float:
        """The kNN accuracy of the starting weights, the baseline a run must beat; a new network's placeholder
        BatchNorm statistics are first measured on the bank images, on a copy (:func:`with_measured_norms`)."""
        return self.accuracy(with_measured_norms(backbone, self._bank(self.bank_loader()), device), device)

    def accuracy(self, backbone: nn.Module, device) -> float:
        was_training = backbone.training
        backbone.eval()
        try:
            bank, bank_y = self._embed(backbone, self._bank(self.bank_loader()), device)
            val, val_y = self._embed(backbone, self.val_loader(), device)
        finally:
            backbone.train(was_training)
        scores = knn_scores(bank, bank_y, val, self.num_classes, self.settings.k, self.settings.temperature)
        return float((scores.argmax(1) == val_y).mean())


class DinoModule(pl.LightningModule):
    """Student (backbone + :class:`DinoHead`) trained to match an EMA teacher over multi-crop views.

    Args:
        backbone: the student's backbone (the teacher starts as a copy of it, never the same object).
        settings: the ``method.dino`` settings.
        crops: the multi-crop transform.
        optimizer: ``params -> Optimizer`` (a config partial).
        scheduler: ``(optimizer, total_steps) -> LRScheduler`` (a config partial), stepped every step.
        meta: the model header stored in checkpoints.
        knn: the per-epoch kNN accuracy, when the recipe has labels.
        seed: seeds the crop generator, reseeded with ``seed + epoch`` at every epoch start.
    """

    def __init__(self, backbone: nn.Module, settings: DinoSettings, crops: MultiCrop, optimizer: Callable,
                 scheduler: Callable | None = None, meta: dict[str, Any] | None = None,
                 knn: KnnMonitor | None = None, seed: int = 0):
        super().__init__()
        self.settings, self.crops, self.knn, self.seed = settings, crops, knn, seed
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.meta = meta or {}
        dim = int(backbone.num_features)
        head = DinoHead(dim, settings.prototypes, settings.hidden_dim, settings.bottleneck_dim,
                        settings.head_batch_norm)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student)
        check_separate(self.student, self.teacher)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss_fn = DinoLoss(settings.prototypes, settings.student_temp, settings.center_momentum)
        self.guard = CollapseGuard(settings.collapse, settings.prototypes, dim, crops)
        self.history: list[dict[str, float]] = []  # one record of signals per epoch
        # the kNN accuracy of the starting weights (random or brought), scored before the first step: the run's
        # own baseline, so the stage can say when pretraining did not help
        self.initial_knn: float | None = None
        self._steps: list[dict[str, float]] = []
        self._generator = torch.Generator()

    @property
    def teacher_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

    def _progress(self) -> float:
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer is not None else 1
        return min(1.0, self.global_step / total)

    def on_train_start(self) -> None:
        if self.knn is None or self.initial_knn is not None or self.global_step > 0:
            return  # a resumed run keeps the baseline its checkpoint recorded
        accuracy = self.knn.starting_accuracy(self.teacher_backbone, self.device) if self.trainer.is_global_zero else 0.0
        self.initial_knn = float(self.trainer.strategy.broadcast(accuracy, src=0))

    def on_train_epoch_start(self) -> None:
        self._generator.manual_seed(self.seed + self.current_epoch)
        self._steps = []
        self.teacher.train()  # the teacher's BatchNorm uses batch statistics, as DINO's does

    def training_step(self, batch, batch_idx):
        x = batch[0]
        views = self.crops(x, generator=self._generator, keys=self._crop_keys(batch))
        temp = self.settings.teacher_temperature(self._progress())
        with torch.no_grad():
            t_features = self.teacher["backbone"](torch.cat(views[:2]))
            t_out = self.teacher["head"](t_features)
        s_out = self._student(views)
        loss, signals = self.loss_fn(list(s_out.chunk(len(views))), list(t_out.chunk(2)), temp)
        self.loss_fn.update_center(t_out)
        signals.update(embedding_std=embedding_std(t_features), teacher_temp=temp)
        self._steps.append(signals)
        self.guard.step(signals, f"epoch {self.current_epoch + 1}, step {self.global_step + 1}")
        # the loss over the global batch (signals["loss"]); the returned one is this process's, which DDP's
        # gradient averaging turns into the global batch's gradient
        self.log("train/loss", signals["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def _crop_keys(self, batch) -> list[int] | None:
        """One crop seed per image from (seed, epoch, the image's table row): an image gets the same views
        whichever batch position or process it lands in (None: a batch without row ids, cropped in batch order)."""
        if len(batch) < 3 or not torch.is_tensor(batch[2]):
            return None
        return [int(np.random.SeedSequence([self.seed, self.current_epoch, int(row)]).generate_state(1)[0])
                for row in batch[2].tolist()]

    def _student(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Student outputs of every view, in view order; views of one size go through the backbone together."""
        outputs, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            outputs.append(self.student["head"](self.student["backbone"](torch.cat(views[start:end]))))
            start = end
        return torch.cat(outputs)

    def on_after_backward(self) -> None:
        if self.current_epoch < self.settings.freeze_last_layer_epochs:
            self.student["head"].prototypes.grad = None  # the prototypes wait until the features settle

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        value = gradient_clip_val or self.settings.clip_grad
        if value:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm="norm")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        m = self.settings.momentum(self._progress())
        with torch.no_grad():
            for s, t in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
                t.mul_(m).add_(s.detach(), alpha=1 - m)

    def on_train_epoch_end(self) -> None:
        if not self._steps:
            return
        record = {k: float(np.mean([s[k] for s in self._steps])) for k in self._steps[0]}
        record.update(epoch=self.current_epoch + 1, steps=len(self._steps), ln_prototypes=math.log(self.settings.prototypes),
                      healthy_std=1 / math.sqrt(int(self.student["backbone"].num_features)))
        record["loss_over_ln_prototypes"] = record["loss"] / record["ln_prototypes"]
        # how many prototypes the teacher spreads a batch over (exp of the batch mean's entropy): falling far below
        # the batch size while the loss falls is a partial collapse that no collapsed-range signal catches
        record["prototypes_in_use"] = math.exp(record["teacher_mean_entropy"])
        record["prototypes_reachable"] = min(float(self.settings.prototypes), record["teacher_outputs"])
        partial = self.guard.spread(record, f"the end of epoch {self.current_epoch + 1}")
        record["partial_collapse"] = partial is not None
        if partial and self.trainer.is_global_zero:
            log.warning(partial)
        if self.knn is not None:
            # rank 0 scores (the teacher is the same on every rank) and tells the others: the records, and what
            # a callback may decide from them, stay identical on every rank
            accuracy = self.knn.accuracy(self.teacher_backbone, self.device) if self.trainer.is_global_zero else 0.0
            record["knn_val_accuracy"] = float(self.trainer.strategy.broadcast(accuracy, src=0))
            self.log("val/knn_acc", record["knn_val_accuracy"], prog_bar=True)
        self.history.append(record)
        self.log_dict({f"dino/{k}": record[k] for k in ("teacher_entropy", "teacher_mean_entropy", "kl",
                                                         "embedding_std")})
        self.guard.end_epoch(record, f"the end of epoch {self.current_epoch + 1}")

    def configure_optimizers(self):
        return lightning_optimizers(self.student.parameters(), self.optimizer_factory, self.scheduler_factory,
                                    self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fmtransfer"] = self.meta
        checkpoint["dino_history"] = self.history
        checkpoint["dino_initial_knn"] = self.initial_knn
        # a signal's run of collapsed steps goes on across a resume: a run killed at step 19 of patience 20 and
        # resumed must stop at the next collapsed step, not 20 steps later
        checkpoint["dino_collapse_streak"] = dict(self.guard.streak)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("dino_history", []))
        self.initial_knn = checkpoint.get("dino_initial_knn")
        self.guard.streak = dict(checkpoint.get("dino_collapse_streak", {}))


def check_separate(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be a copy: sharing the student's tensors makes the teacher follow every step, and the
    loss sits at ln K (a uniform collapse once caused this way)."""
    own = {p.data_ptr() for p in student.parameters()}
    if teacher is student or any(p.data_ptr() in own for p in teacher.parameters()):
        raise ConfigError("DINO's teacher shares tensors with the student; it must be a separate EMA copy")
