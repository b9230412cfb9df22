"""The one backbone factory: any timm model, local or hub weights, and its embedding dimension."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from fmtransfer.config import build_dataclass
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.models.families import auto_patch_size, family_of

# keys of a classifier head in timm checkpoints; a backbone built with num_classes=0 has none
_HEAD_PREFIXES = ("fc.", "head.", "head_dist.", "classifier.", "last_linear.")


@dataclass
class BackboneSpec:
    """How to build a backbone (the ``backbone`` config node).

    Attributes:
        name: any ``timm.create_model`` name.
        pretrained: load timm's pretrained weights through timm's own hub loading.
        checkpoint: a local weights file (.safetensors, .pt/.pth/.ckpt; loaded with weights_only=True).
        in_chans: input channels (default: the data recipe's).
        img_size: input size for families whose layers depend on it (ViT, Swin); ignored by others.
        patch_size: ViT patch size; "auto" picks one that suits small images (see ``auto_patch_size``).
        drop_path_rate: stochastic depth.
        kwargs: passed to ``timm.create_model`` as they are.
    """

    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    in_chans: int = 3
    img_size: Any = None
    patch_size: Any = "auto"
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not timm.is_model(self.name):
            close = timm.list_models(f"*{self.name.split('_')[0]}*")[:8]
            raise ConfigError(f"backbone.name={self.name!r} is not a timm model"
                              + (f"; similar: {', '.join(close)}" if close else ""))
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
    """Build ``spec`` as a feature extractor (no classifier head). ``model.num_features`` is its embedding dim."""
    family = family_of(spec.name)
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": int(spec.in_chans), **spec.kwargs}
    if spec.drop_path_rate:
        kwargs["drop_path_rate"] = spec.drop_path_rate
    if family.takes_img_size and spec.img_size is not None:
        kwargs.setdefault("img_size", tuple(spec.img_size))
    if family.takes_patch_size and spec.patch_size is not None:
        patch = auto_patch_size(tuple(spec.img_size or (224, 224))) if spec.patch_size == "auto" else spec.patch_size
        kwargs.setdefault("patch_size", patch)
    try:
        model = timm.create_model(spec.name, pretrained=spec.pretrained, **kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone {spec.name!r} does not accept these settings ({e}); check backbone.kwargs") from e
    if spec.checkpoint:
        load_backbone_weights(model, spec.checkpoint)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling: safetensors, or torch.load(weights_only=True)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated, or holds pickled code
        raise ArtifactError(f"cannot read checkpoint {path} safely ({type(e).__name__}: {e}); fmtransfer "
                            f"loads only plain tensors (weights_only=True) or safetensors") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ArtifactError(f"checkpoint {path} does not hold a state dict of tensors")
    return obj


def _strip_to_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep backbone weights: our own files prefix them with ``backbone.`` (Lightning adds ``model.``)."""
    for prefix in ("model.backbone.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load local weights into a backbone; shape and key mismatches are errors naming the file."""
    state = _strip_to_backbone(read_state_dict(path))
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ArtifactError(f"checkpoint {path}: {key} has shape {tuple(value.shape)} but the backbone expects "
                                f"{tuple(own[key].shape)}; check backbone.name, backbone.in_chans and image size")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ArtifactError(f"checkpoint {path} lacks {len(result.missing_keys)} backbone weight(s), e.g. "
                            f"{result.missing_keys[:3]}; is it a checkpoint of this architecture?")
    if result.unexpected_keys:
        raise ArtifactError(f"checkpoint {path} has {len(result.unexpected_keys)} weight(s) this backbone does "
                            f"not, e.g. {result.unexpected_keys[:3]}; is it a checkpoint of this architecture?")


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
