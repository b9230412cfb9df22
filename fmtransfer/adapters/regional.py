"""Regional pretraining (ExPLoRA, Khanna et al. 2024): before an adapter is fitted from a region's few labels, the
base continues self-supervised (DINO) on the region's unlabelled train split, training only the adapter method's own
parameters (LoRA, prompts) plus the normalisation layers' scale and shift, or the whole last block.

What it changes belongs to the adapter file (:func:`unfreeze_regional` names it for
:func:`fmtransfer.adapters.methods.adapter_state`), so a region stays one small file over the unchanged shared base.
The state it leaves is saved as ``regional_pretrain.safetensors`` (an adapter file without a head) so that other
runs over the same base and method take it instead of pretraining again (``regional_pretrain.reuse``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fmtransfer.adapters.artifact import read_adapter, save_adapter
from fmtransfer.adapters.loading import check_finished
from fmtransfer.adapters.methods import AdapterMethod, batchnorm_modules, norm_modules
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.models.classifier import EMBEDDING_TASK, Classifier
from fmtransfer.models.dino import DinoSettings
from fmtransfer.models.families import family_of
from fmtransfer.models.vpt import PromptedViT

# the methods whose own parameters can learn from unlabelled images: the rest train the whole backbone (full,
# scratch, where DINO would be full pretraining), nothing of it (linear_probe) or biases only (bitfit)
REGIONAL_METHODS = ("lora", "vpt")
REGIONAL_FILE = "regional_pretrain.safetensors"
Trainable = Literal["norms", "last_block"]


@dataclass(frozen=True)
class RegionalPretrainSettings:
    """``regional_pretrain`` of ``configs/adapt.yaml`` (its DINO keys come from ``configs/method/dino.yaml``).

    Attributes:
        epochs: DINO epochs over the region's train split, labels unused (0: off).
        trainable: besides the method's parameters: ``norms`` (every normalisation layer's scale and shift) or
            ``last_block`` (those and every parameter of the backbone's last block).
        reuse: an earlier adapt run dir (or its ``regional_pretrain.safetensors``) over the same base and method whose
            regional pretraining this run takes instead of running its own (None: pretrain here).
        compare: also fit the adapter without regional pretraining (same calibration set, seed and steps) and score
            both, so that the run says whether it helped.
        optimizer: a partial ``torch.optim`` spec. scheduler: a schedule spec (None: a constant rate).
        dino: DINO's settings (crops, temperatures, EMA teacher, collapse guard).
    """

    epochs: int
    trainable: Trainable
    reuse: str | None
    compare: bool
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    dino: DinoSettings

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"regional_pretrain.epochs={self.epochs} must be >= 0 (0: no regional pretraining)")

    @property
    def enabled(self) -> bool:
        return self.epochs > 0 or self.reuse is not None


def check_regional_method(settings: RegionalPretrainSettings, method_name: str) -> None:
    """Raise ConfigError when regional pretraining is asked of a method it cannot serve."""
    if settings.enabled and method_name not in REGIONAL_METHODS:
        key = f"regional_pretrain.epochs={settings.epochs}" if settings.epochs else f"regional_pretrain.reuse={settings.reuse}"
        raise ConfigError(f"{key} needs an adapter whose own parameters learn from unlabelled images: adapter="
                          f"{' or adapter='.join(REGIONAL_METHODS)}, not adapter={method_name}; or set "
                          f"regional_pretrain.epochs=0")


def last_block(backbone: torch.nn.Module, backbone_name: str) -> str:
    """The module name of the backbone's last block (by the family table's ``blocks``).

    Raises:
        ConfigError: a family whose blocks the table does not know.
    """
    root, prefix = (backbone.vit, "vit.") if isinstance(backbone, PromptedViT) else (backbone, "")
    family = family_of(backbone_name)
    names = [n for n, _ in root.named_modules() if family.blocks and re.fullmatch(family.blocks, n)]
    if not names:
        raise ConfigError(f"regional_pretrain.trainable=last_block: the blocks of backbone {backbone_name!r} (family "
                          f"{family.name!r}) are not known; use regional_pretrain.trainable=norms")
    return prefix + names[-1]


def unfreeze_regional(model: Classifier, backbone_name: str, trainable: Trainable) -> list[str]:
    """Make the normalisation layers (and the last block) trainable, besides what the method made trainable.

    Returns:
        the names (as in ``model.named_parameters()``) of the parameters this made trainable: regional pretraining
        changes them, the supervised fit leaves them frozen, and the adapter file holds them.
    """
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    for _, module in norm_modules(model.backbone):
        for p in module.parameters(recurse=False):
            p.requires_grad = True
    if trainable == "last_block":
        for p in model.backbone.get_submodule(last_block(model.backbone, backbone_name)).parameters():
            p.requires_grad = True
    return sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in before)


def freeze(model: Classifier, names: list[str]) -> None:
    """Stop training the parameters ``names`` (the supervised fit takes them as regional pretraining left them)."""
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad = False


def regional_state(model: Classifier) -> dict[str, torch.Tensor]:
    """The backbone's trainable parameters and BatchNorm statistics: all that regional pretraining changes."""
    names = {f"backbone.{n}" for n, p in model.backbone.named_parameters() if p.requires_grad}
    for mod_name, module in batchnorm_modules(model.backbone):
        names |= {f"backbone.{mod_name}.{b}" for b, _ in module.named_buffers(recurse=False)}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}


def save_regional(path: Path, model: Classifier, method: AdapterMethod, base: dict[str, Any], preprocess: dict,
                  record: dict[str, Any], lineage: dict[str, Any]) -> Path:
    """``regional_pretrain.safetensors``: the pretrained state as an adapter file without a head (sealed header)."""
    header = {"method": method.describe(), "base": base, "task": EMBEDDING_TASK, "classes": None, "num_outputs": 0,
              "preprocess": preprocess, "regional_pretrain": record, "lineage": lineage}
    return save_adapter(path, regional_state(model), header)


def read_regional(reuse: str, model: Classifier, method: AdapterMethod, base_sha256: str, trainable: Trainable,
                  allow_unfinished: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An earlier run's regional pretraining, checked against this run (``model``: the method attached).

    Returns:
        that run's record of it (``regional_pretrain`` of its header, with ``reused_from``) and its tensors.

    Raises:
        ArtifactError: no such file, an edited one, an unfinished run's, another base, another method or another
        ``trainable``, or tensors that do not fit ``model``.
    """
    path = Path(reuse).expanduser()
    path = path / REGIONAL_FILE if path.is_dir() else path
    if not path.is_file():
        raise ArtifactError(f"regional_pretrain.reuse={reuse}: no {REGIONAL_FILE} there (an adapt run with "
                            f"regional_pretrain.epochs > 0 writes it)")
    header, state = read_adapter(path)
    check_finished(path, header, "regional_pretrain.reuse", allow_unfinished)
    record = header.get("regional_pretrain")
    theirs = {"base": header["base"]["sha256"], "method": header["method"],
              "trainable": (record or {}).get("trainable")}
    ours = {"base": base_sha256, "method": method.describe(), "trainable": trainable}
    differs = [k for k in ours if theirs[k] != ours[k]]
    if record is None or differs:
        raise ArtifactError(f"regional_pretrain.reuse={reuse}: {path} was pretrained with another "
                            f"{' and '.join(differs) or 'kind of file'} ({', '.join(f'{k}={theirs[k]}' for k in differs)}; "
                            f"this run: {', '.join(f'{k}={ours[k]}' for k in differs)})")
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    if unknown:
        raise ArtifactError(f"regional_pretrain.reuse={reuse}: {len(unknown)} tensors of {path} do not fit this "
                            f"model, e.g. {unknown[:3]}")
    return {**record, "reused_from": str(path.resolve())}, state
