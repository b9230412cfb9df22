"""The one backbone factory: any timm model, local or hub weights, and its embedding dimension."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import nn

from fmtransfer.config import build_dataclass
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage.io import sha256_file
from fmtransfer.models.families import auto_patch_size, family_of
from fmtransfer.models.weights import (
    WeightsRecord,
    backbone_state,
    drop_training_only,
    fit_state,
    load_checkpoint_file,
    load_fitted,
    select_network,
)

log = logging.getLogger(__name__)

# names timm resolves through a hub or a folder rather than its registry
_HUB_PREFIXES = ("hf-hub:", "local-dir:")
# where create_backbone leaves its WeightsRecord (as a dict) on the model it returns
WEIGHTS_ATTR = "fmtransfer_weights"


@dataclass
class BackboneSpec:
    """How to build a backbone (the ``backbone`` config node).

    Attributes:
        name: any ``timm.create_model`` name, or a hub id ``hf-hub:<org>/<repo>``.
        pretrained: load timm's pretrained weights through timm's own hub loading (or the file named by
            ``kwargs.pretrained_cfg_overlay.file``), then fit them to this model.
        checkpoint: a local weights file (.safetensors, .pt/.pth/.ckpt; loaded with weights_only=True): a plain
            state dict, a training checkpoint, or a DINO/DINOv2 teacher/student checkpoint.
        checkpoint_key: the network of a teacher/student checkpoint: ``auto`` (the teacher where there are both),
            ``teacher`` or ``student``.
        in_chans: input channels (default: the data recipe's).
        img_size: input size for families whose layers depend on it (ViT, Swin); ignored by others.
        patch_size: ViT patch size; "auto" picks one that suits small images (see ``auto_patch_size``).
        drop_path_rate: stochastic depth.
        kwargs: passed to ``timm.create_model`` as they are.
    """

    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    checkpoint_key: Literal["auto", "teacher", "student"] = "auto"
    in_chans: int = 3
    img_size: Any = None
    patch_size: Any = "auto"
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hub = self.name.startswith(_HUB_PREFIXES)
        if not hub and not timm.is_model(self.name):
            close = timm.list_models(f"*{self.name.split('_')[0]}*")[:8]
            raise ConfigError(f"backbone.name={self.name!r} is not a timm model"
                              + (f"; similar: {', '.join(close)}" if close else ""))
        if self.pretrained and self.checkpoint:
            raise ConfigError(f"backbone.pretrained=true and backbone.checkpoint={self.checkpoint} both name weights; "
                              f"set one (backbone.pretrained=false to use the file)")
        if isinstance(self.img_size, int):
            self.img_size = [self.img_size, self.img_size]
        if self.patch_size not in ("auto", None) and not (isinstance(self.patch_size, int) and self.patch_size > 0):
            raise ConfigError(f"backbone.patch_size={self.patch_size!r}; expected 'auto', null or a positive int")

    def architecture(self) -> dict[str, Any]:
        """What fixes the architecture (not where weights came from): enough to rebuild the model."""
        return {"name": self.name, "in_chans": self.in_chans, "img_size": self.img_size,
                "patch_size": self.patch_size, "drop_path_rate": self.drop_path_rate, "kwargs": dict(self.kwargs)}


def backbone_spec(node: Any) -> BackboneSpec:
    return build_dataclass(BackboneSpec, node, "backbone")


def create_backbone(spec: BackboneSpec) -> nn.Module:
    """Build ``spec`` as a feature extractor (no classifier head). ``model.num_features`` is its embedding dim.

    Brought weights (``pretrained`` or ``checkpoint``) are fitted to the model built for the recipe (position
    embeddings, patch size, input channels); what was changed is on the model as ``weights_record(model)``.
    """
    hub_state = _pretrained_state(spec) if spec.pretrained else None  # first: no hub means no model to build
    model = _build(spec)
    record = None
    if hub_state is not None:
        state, location = hub_state
        record = WeightsRecord("timm", location)
        _load(model, state, record, f"timm's pretrained weights for {spec.name!r} ({location})", spec.name)
    elif spec.checkpoint:
        record = load_backbone_weights(model, spec.checkpoint, spec.checkpoint_key, model_name=spec.name)
    setattr(model, WEIGHTS_ATTR, record.to_dict() if record else None)
    return model


def weights_record(backbone: nn.Module) -> dict[str, Any] | None:
    """What :func:`create_backbone` recorded about the weights it loaded (None: random initial weights)."""
    return getattr(backbone, WEIGHTS_ATTR, None)


def _build(spec: BackboneSpec) -> nn.Module:
    """The architecture ``spec`` names, for the recipe's channels and size, with random weights."""
    family = family_of(spec.name)
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": int(spec.in_chans), **spec.kwargs}
    if spec.drop_path_rate:
        kwargs["drop_path_rate"] = spec.drop_path_rate
    if family.takes_img_size and spec.img_size is not None:
        kwargs.setdefault("img_size", tuple(spec.img_size))
    if family.takes_patch_size and spec.patch_size is not None:
        patch = auto_patch_size(tuple(spec.img_size or (224, 224))) if spec.patch_size == "auto" else spec.patch_size
        kwargs.setdefault("patch_size", patch)
    return _timm_create(spec.name, kwargs, pretrained=False)


def _timm_create(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone {name!r} does not accept these settings ({e}); check backbone.kwargs") from e
    except Exception as e:  # noqa: BLE001 - the hub's errors (no connection, unknown id) become one line
        if pretrained or name.startswith(_HUB_PREFIXES):
            raise ArtifactError(hub_error(name, e)) from e
        raise


def _pretrained_state(spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], str]:
    """timm's pretrained weights for ``spec.name`` at their own architecture (timm converts the hub's format),
    and where they came from. Fitting them to the recipe is left to :func:`fit_state`, which records it."""
    overlay = spec.kwargs.get("pretrained_cfg_overlay") or {}
    if overlay.get("file") and not Path(overlay["file"]).expanduser().is_file():
        raise ArtifactError(f"backbone.kwargs.pretrained_cfg_overlay.file: {overlay['file']} does not exist")
    source = _timm_create(spec.name, {"num_classes": 0, **spec.kwargs}, pretrained=True)
    cfg = getattr(source, "pretrained_cfg", {}) or {}
    location = str(cfg.get("file") or cfg.get("hf_hub_id") or cfg.get("url") or spec.name)
    return source.state_dict(), location


def hub_error(name: str, error: Exception) -> str:
    """One line saying why timm could not fetch ``name``'s weights: no connection, unknown id, or no weights."""
    from huggingface_hub import constants, errors

    first = (str(error).strip().splitlines() or [""])[0][:200]
    if isinstance(error, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
        return (f"backbone.name={name!r}: the hub has no such model, or it is private or gated (log in with "
                f"`hf auth login`); {type(error).__name__}: {first}")
    if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError,
                          TimeoutError)):
        return (f"backbone.pretrained=true: cannot download the weights of {name!r} (no internet connection, or "
                f"HF_HUB_OFFLINE is set) and they are not in the local cache {constants.HF_HUB_CACHE}; without "
                f"internet, copy the weights here and pass backbone.checkpoint=<file>")
    if isinstance(error, RuntimeError) and "No pretrained weights exist" in str(error):
        return (f"backbone.pretrained=true: timm has no pretrained weights for {name!r} (see "
                f"timm.list_pretrained()); pass backbone.checkpoint=<file> instead")
    return f"backbone {name!r}: timm could not load its pretrained weights ({type(error).__name__}: {first})"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling: safetensors, or torch.load(weights_only=True)."""
    obj = load_checkpoint_file(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ArtifactError(f"checkpoint {path} does not hold a state dict of tensors")
    return obj


def load_backbone_weights(model: nn.Module, path: str | Path, checkpoint_key: str = "auto", *,
                          model_name: str | None = None) -> WeightsRecord:
    """Load a local checkpoint into a backbone: the chosen network's backbone, fitted to the model.

    Raises:
        ArtifactError: an unreadable file, or weights of another architecture (naming keys and the likely cause).
        ConfigError: first-layer weights whose channels cannot be adapted to the model's.
    """
    path = Path(path).expanduser()
    network, chosen = select_network(load_checkpoint_file(path), path, checkpoint_key)
    state, prefixes, dropped = backbone_state(network, path)
    record = WeightsRecord("checkpoint", str(path), sha256_file(path), chosen, prefixes, dropped)
    _load(model, state, record, f"checkpoint {path}", model_name or type(model).__name__)
    return record


def _load(model: nn.Module, state: dict[str, torch.Tensor], record: WeightsRecord, where: str, name: str) -> None:
    """Fit ``state`` to ``model`` and load it; ``record`` gains what was dropped and adapted."""
    state, training_only = drop_training_only(state, model)
    state, record.adapted = fit_state(state, model, where)
    load_fitted(model, state, where, name)
    record.dropped.update(training_only)
    parts = [f"network {record.checkpoint_key}"] if record.checkpoint_key else []
    parts += [f"removed prefixes {', '.join(record.prefixes)}"] if record.prefixes else []
    parts += [f"dropped {', '.join(f'{k}.* ({n})' for k, n in record.dropped.items())}"] if record.dropped else []
    parts += [f"adapted {', '.join(f'{k} {v}' for k, v in record.adapted.items())}"] if record.adapted else []
    log.info("backbone %s: weights from %s%s", name, where, f"; {'; '.join(parts)}" if parts else "")


def check_input_size(model: nn.Module, spec: BackboneSpec, image_size: list[int] | tuple[int, int], channels: int) -> None:
    """One dry forward pass at the data's size; a model that cannot take it is a ConfigError that suggests a size.

    Some families cannot take small images (ConvNeXt and others downsample 32x): better to say so now than
    after the data is read and a trainer is built.
    """
    def works(size) -> bool:
        try:
            with torch.no_grad():
                model(torch.zeros(1, channels, *size))
            return True
        except RuntimeError:
            return False

    was_training = model.training
    model.eval()
    try:
        if works(tuple(image_size)) or spec.img_size not in (None, list(image_size)):
            return
        smallest = next((s for s in (32, 48, 64, 96, 128, 224) if s > min(image_size) and works((s, s))), None)
    finally:
        model.train(was_training)
    hint = f"set data.image_size=[{smallest},{smallest}] or more" if smallest else "use another backbone"
    raise ConfigError(f"backbone {spec.name!r} cannot take {image_size[0]}x{image_size[1]} images; {hint}")
