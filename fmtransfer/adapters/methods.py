"""Adapter methods: what becomes trainable, what structure is added, and how it folds back into weights.

Each method is a small dataclass built from ``configs/adapter/<name>.yaml`` (``adapter.method``). Adapter files
name their method by ``name`` and are rebuilt through ``METHODS``, never from a ``_target_`` in a file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.models.classifier import Classifier
from fmtransfer.models.families import family_of
from fmtransfer.models.vpt import PromptedViT

NormStats = Literal["adapt", "frozen"]
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@dataclass
class AdapterMethod:
    """Base class.

    Attributes:
        norm_stats: BatchNorm running statistics during adaptation: "adapt" re-estimates them on the region's
            data (and saves them in the adapter), "frozen" keeps the global ones.
    """

    name: ClassVar[str] = ""
    reuse_head: ClassVar[bool] = True  # start from the global head's rows for classes it knows
    norm_stats: NormStats = "adapt"

    def __post_init__(self) -> None:
        if self.norm_stats not in ("adapt", "frozen"):
            raise ConfigError(f"adapter.method.norm_stats={self.norm_stats!r}; expected 'adapt' or 'frozen'")

    # --- structure -------------------------------------------------------------------------------------
    def attach(self, model: Classifier, backbone_name: str) -> None:
        """Add structure to ``model.backbone`` and set ``requires_grad`` (the head is the caller's)."""
        for p in model.backbone.parameters():
            p.requires_grad = False
        self._unfreeze(model, backbone_name)

    def _unfreeze(self, model: Classifier, backbone_name: str) -> None:
        """Make this method's backbone parameters trainable."""

    def detach(self, model: Classifier) -> None:
        """Remove added structure without folding it in (the base is as it was, but for loaded weights)."""

    def merge(self, model: Classifier) -> None:
        """Fold added structure into plain weights where it can be folded."""

    def merged_structure(self) -> dict[str, Any] | None:
        """Structure a merged model keeps (recorded in model.json so it can be rebuilt), or None."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def _train_norm_affine(model: nn.Module) -> None:
    for _, module in norm_modules(model):
        for p in module.parameters(recurse=False):
            p.requires_grad = True


@dataclass
class Full(AdapterMethod):
    """Every weight trainable: the strongest baseline, and the largest adapter file (the whole model)."""

    name: ClassVar[str] = "full"

    def _unfreeze(self, model, backbone_name):
        for p in model.backbone.parameters():
            p.requires_grad = True


@dataclass
class Scratch(Full):
    """Random initialisation, then every weight trained on the calibration set: the "no global model" line."""

    name: ClassVar[str] = "scratch"
    reuse_head: ClassVar[bool] = False

    def _unfreeze(self, model, backbone_name):
        for module in model.backbone.modules():
            if module is not model.backbone and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        super()._unfreeze(model, backbone_name)


@dataclass
class LinearProbe(AdapterMethod):
    """Frozen backbone (and, by default, frozen normalisation statistics); only the head trains."""

    name: ClassVar[str] = "linear_probe"
    norm_stats: NormStats = "frozen"


@dataclass
class BitFit(AdapterMethod):
    """Bias terms (including normalisation shifts) and the head."""

    name: ClassVar[str] = "bitfit"

    def _unfreeze(self, model, backbone_name):
        for name, p in model.backbone.named_parameters():
            if name.endswith("bias"):
                p.requires_grad = True


@dataclass
class LoRA(AdapterMethod):
    """Low-rank updates (PEFT LoRA) on the family's target layers, optionally with normalisation affines.

    Attributes:
        rank, alpha, dropout: LoRA's r, lora_alpha and lora_dropout.
        target_modules: regex (full match) over backbone module names; None uses the family table.
        train_norms: also train normalisation layers' scale and shift (a few thousand parameters).
    """

    name: ClassVar[str] = "lora"
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | None = None
    train_norms: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.rank) < 1:
            raise ConfigError(f"adapter.method.rank={self.rank} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.method.dropout={self.dropout} must be in [0, 1)")

    def targets(self, backbone: nn.Module, backbone_name: str) -> list[str]:
        pattern = self.target_modules or family_of(backbone_name).lora_targets
        layers = [n for n, m in backbone.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        chosen = [n for n in layers if pattern is None or re.fullmatch(pattern, n)]
        if not chosen:
            raise ConfigError(f"adapter.method.target_modules={pattern!r} matches no Linear or Conv2d layer of "
                              f"{backbone_name!r}; its layers are named like: {', '.join(layers[:6])}")
        return chosen

    def attach(self, model, backbone_name):
        from peft import LoraConfig, LoraModel

        config = LoraConfig(r=int(self.rank), lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.targets(model.backbone, backbone_name))
        # LoraModel injects the layers into the backbone in place (all that inject_adapter_in_model does), and
        # its handle, kept here, takes them out again; it is not registered in the model, so the backbone's
        # parameter names (those of adapter files) stay as they are
        self._tuner = LoraModel(model.backbone, config, "default")
        for name, p in model.backbone.named_parameters():
            p.requires_grad = "lora_" in name
        if self.train_norms:
            _train_norm_affine(model.backbone)

    def _attached_tuner(self, model: Classifier):
        tuner = getattr(self, "_tuner", None)
        if tuner is None or tuner.model is not model.backbone:
            raise ArtifactError("LoRA: this model's LoRA layers were not attached by this method object")
        self._tuner = None
        return tuner

    def detach(self, model):
        model.backbone = self._attached_tuner(model).unload()

    def merge(self, model):
        model.backbone = self._attached_tuner(model).merge_and_unload()


@dataclass
class VPT(AdapterMethod):
    """Visual prompt tuning (Jia et al. 2022) for timm ViTs: learnable tokens after the class token.

    Attributes:
        num_tokens: prompt tokens per layer.
        deep: new prompts at every block (deep VPT) or only at the input (shallow).
        dropout: dropout on the prompts.
        train_norms: also train LayerNorm scale and shift.
    """

    name: ClassVar[str] = "vpt"
    num_tokens: int = 10
    deep: bool = True
    dropout: float = 0.0
    train_norms: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.num_tokens) < 1:
            raise ConfigError(f"adapter.method.num_tokens={self.num_tokens} must be >= 1")

    def attach(self, model, backbone_name):
        check_method_fits(self.name, backbone_name)
        for p in model.backbone.parameters():
            p.requires_grad = False
        model.backbone = PromptedViT(model.backbone, self.num_tokens, self.deep, self.dropout)
        if self.train_norms:
            _train_norm_affine(model.backbone)

    def detach(self, model):
        model.backbone = model.backbone.vit

    def merged_structure(self):
        return {"prompts": {"num_tokens": int(self.num_tokens), "deep": bool(self.deep)}}


METHODS: dict[str, type[AdapterMethod]] = {
    cls.name: cls for cls in (Full, Scratch, LinearProbe, BitFit, LoRA, VPT)
}


def check_method_fits(method_name: str, backbone_name: str) -> None:
    """Raise ConfigError unless adapter method ``method_name`` (a ``METHODS`` key) can adapt a backbone of timm
    name ``backbone_name``: an unknown method, or visual prompts on a backbone that is not a Vision Transformer."""
    if method_name not in METHODS:
        raise ConfigError(f"adapter={method_name!r} is not an adapter method; choose from {', '.join(METHODS)}")
    family = family_of(backbone_name)
    if method_name == VPT.name and not family.prompts:
        raise ConfigError(f"adapter=vpt needs a Vision Transformer, but backbone {backbone_name!r} is of the "
                          f"{family.name!r} family; use adapter=lora for it")


def method_from_description(description: dict[str, Any]) -> AdapterMethod:
    """Rebuild a method from an adapter file's header (by name, from the known classes only)."""
    values = dict(description)
    name = values.pop("name", None)
    if name not in METHODS:
        raise ConfigError(f"unknown adapter method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name](**values)


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_state(model: Classifier, method: AdapterMethod, extra: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """What an adapter file holds: trainable weights, the head, and adapted BatchNorm statistics.

    Args:
        extra: names of ``model``'s parameters changed earlier and frozen since (regional pretraining's norms or last
            block): they belong to the adapter as well.
    """
    names = {n for n, p in model.named_parameters() if p.requires_grad} | set(extra)
    names |= {f"head.{n}" for n, _ in model.head.named_parameters()}
    if method.norm_stats == "adapt":
        for mod_name, module in batchnorm_modules(model):
            names |= {f"{mod_name}.{b}" for b, _ in module.named_buffers(recurse=False)}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}
