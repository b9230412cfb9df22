"""Foundation weights a user brings: read a checkpoint safely, find the backbone in it, fit it to the model.

A checkpoint from a self-supervised repository holds more than a backbone: DINO saves ``{"teacher": ...,
"student": ...}`` with ``backbone.`` / ``module.backbone.`` keys and projection heads beside them, DINOv2
``teacher.backbone.`` keys (and a training-only mask token). :func:`backbone_state` picks one network and
keeps its backbone; :func:`fit_state` then fits the weights to a model built for the recipe (position
embeddings, patch size, input channels) with timm's helpers, and says what it changed, so that the model
header and the stage's metrics can record it.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv, get_model_traits
from torch import nn

from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.models.families import family_of, family_of_keys

log = logging.getLogger(__name__)

# keys of a classifier head in timm checkpoints; a backbone built with num_classes=0 has none
HEAD_PREFIXES = ("fc.", "head.", "head_dist.", "classifier.", "last_linear.")
# wrappers that prefix every key: DistributedDataParallel / DataParallel, torch.compile
_WRAPPERS = ("module.", "_orig_mod.")
# where training scripts nest the weights (timm, Lightning, fvcore / DINOv2, plain torch)
_CONTAINERS = ("state_dict", "model", "model_state_dict")
# the networks of a self-distillation checkpoint; the teacher (an average of the student) is the one released
_NETWORKS = ("teacher", "student")
# weights used only while pretraining: DINOv2's / iBOT's token for masked patches
_TRAINING_ONLY = ("mask_token",)


@dataclass
class WeightsRecord:
    """Where a backbone's initial weights came from and what was changed to fit them (JSON-ready).

    Attributes:
        source: ``checkpoint`` (backbone.checkpoint) or ``timm`` (backbone.pretrained, timm's hub or a file
            named by ``pretrained_cfg_overlay``).
        location: the checkpoint's path, or the hub id / file / URL timm loaded.
        sha256: the checkpoint file's sha256 (None for timm's own loading).
        checkpoint_key: ``teacher`` or ``student`` where the file held both networks.
        prefixes: key prefixes removed (``module.``, ``_orig_mod.``, ``backbone.``, ...).
        dropped: key groups of the file the backbone does not use, with their counts (e.g. ``{"head": 6}``).
        adapted: what was changed to fit the model, e.g. ``{"pos_embed": "14x14 -> 8x8",
            "in_chans": "3 -> 1 (summed)"}``.
    """

    source: str
    location: str
    sha256: str | None = None
    checkpoint_key: str | None = None
    prefixes: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_checkpoint_file(path: str | Path) -> Any:
    """The object in a weights file, read without running code: safetensors, or torch.load(weights_only=True).

    ``argparse.Namespace`` is allowed besides tensors and containers: DINO saves its command line in its
    checkpoints, and a namespace only holds attribute values.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated, or holds pickled code
        raise ArtifactError(f"cannot read checkpoint {path} safely ({type(e).__name__}: {e}); fmtransfer "
                            f"loads only plain tensors (weights_only=True) or safetensors") from e


def unwrap(key: str) -> tuple[str, list[str]]:
    """``key`` without leading DDP / torch.compile wrappers, and the wrappers removed."""
    removed = []
    while key.startswith(_WRAPPERS):
        prefix = next(p for p in _WRAPPERS if key.startswith(p))
        removed.append(prefix)
        key = key[len(prefix):]
    return key, removed


def select_network(obj: Any, path: str | Path, key: str = "auto") -> tuple[dict[str, Any], str | None]:
    """The state dict of one network in a checkpoint object: containers opened, teacher or student chosen.

    Args:
        obj: what :func:`load_checkpoint_file` returned.
        path: the file (named in errors).
        key: ``auto`` (the teacher where there are both), ``teacher`` or ``student``.

    Returns:
        (the chosen state dict, ``teacher``/``student`` or None where the file holds one network).
    """
    if not isinstance(obj, dict):
        raise ArtifactError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict of tensors")
    nested = [n for n in _NETWORKS if isinstance(obj.get(n), dict)]
    if nested:
        chosen = _choose(nested, key, path)
        return obj[chosen], chosen
    for container in _CONTAINERS:
        if isinstance(obj.get(container), dict):
            return select_network(obj[container], path, key)
    flat = {unwrap(k)[0]: k for k in obj}
    prefixed = [n for n in _NETWORKS if any(k.startswith(n + ".") for k in flat)]
    if prefixed:
        chosen = _choose(prefixed, key, path)
        cut = len(chosen) + 1
        return {k[cut:]: obj[orig] for k, orig in flat.items() if k.startswith(chosen + ".")}, chosen
    if key != "auto":
        raise ArtifactError(f"checkpoint {path} holds no {key!r} network (backbone.checkpoint_key={key}); it is a "
                            f"plain state dict: use backbone.checkpoint_key=auto")
    return obj, None


def _choose(found: list[str], key: str, path: str | Path) -> str:
    if key == "auto":
        return "teacher" if "teacher" in found else found[0]
    if key not in found:
        raise ArtifactError(f"checkpoint {path} holds no {key!r} network (backbone.checkpoint_key={key}); it has "
                            f"{', '.join(found)}")
    return key


def backbone_state(state: dict[str, Any], path: str | Path) -> tuple[dict[str, torch.Tensor], list[str],
                                                                     dict[str, int]]:
    """The backbone's tensors of one network's state dict, wrappers and ``backbone.`` prefixes removed.

    Where keys carry ``backbone.`` (DINO's MultiCropWrapper, fmtransfer's Classifier, Lightning's ``model.``
    around it) only those are kept; otherwise classifier heads are dropped. Returns (state, prefixes removed,
    dropped key groups with their counts).
    """
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ArtifactError(f"checkpoint {path} does not hold a state dict of tensors (e.g. {bad[:3]} are not "
                            f"tensors)")
    prefixes: set[str] = set()
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare, removed = unwrap(key)
        prefixes.update(removed)
        plain[bare] = value
    for prefix in ("model.backbone.", "backbone."):
        if any(k.startswith(prefix) for k in plain):
            prefixes.add(prefix)
            kept = {}
            for key, value in plain.items():
                if key.startswith(prefix):
                    bare, removed = unwrap(key[len(prefix):])
                    prefixes.update(removed)
                    kept[bare] = value
            return kept, sorted(prefixes), _groups(k for k in plain if not k.startswith(prefix))
    kept = {k: v for k, v in plain.items() if not k.startswith(HEAD_PREFIXES)}
    return kept, sorted(prefixes), _groups(k for k in plain if k.startswith(HEAD_PREFIXES))


def _groups(keys) -> dict[str, int]:
    """Keys counted by their first component (``head.mlp.0.weight`` -> ``head``)."""
    return dict(sorted(Counter(k.split(".", 1)[0] for k in keys).items()))


def drop_training_only(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor],
                                                                                 dict[str, int]]:
    """``state`` without pretraining-only weights the model lacks (DINOv2's mask token), and what was dropped."""
    own = model.state_dict()
    dropped = [k for k in state if k in _TRAINING_ONLY and k not in own]
    return {k: v for k, v in state.items() if k not in dropped}, _groups(dropped)


def fit_state(state: dict[str, torch.Tensor], model: nn.Module, where: str) -> tuple[dict[str, torch.Tensor],
                                                                                      dict[str, str]]:
    """Fit a backbone state dict to ``model``: position embeddings resampled to its token grid, patch-embedding
    kernels to its patch size, RGB first-layer weights to its input channels (timm's helpers each).

    Args:
        state: backbone weights (keys as in ``model.state_dict()``).
        model: the backbone built for the recipe.
        where: the weights' origin, named in errors.

    Returns:
        (the fitted state dict, what was changed: ``{"pos_embed": "14x14 -> 8x8", ...}``).
    """
    own = model.state_dict()
    state, adapted = dict(state), {}
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        state["pos_embed"], adapted["pos_embed"] = _resample_pos_embed(pos, model, where)
    for conv in _first_convs(model):
        key = f"{conv}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape != own[key].shape:
            weight = state[key]
            if weight.shape[1] != own[key].shape[1]:
                weight, adapted["in_chans"] = _adapt_channels(weight, own[key].shape[1], key, where)
            if weight.shape[-2:] != own[key].shape[-2:] and conv == "patch_embed.proj":
                new = list(own[key].shape[-2:])
                adapted["patch_size"] = f"{_size(weight.shape[-2:])} -> {_size(new)}"
                weight = resample_patch_embed(weight, new)
            state[key] = weight
    return state, adapted


def _size(hw) -> str:
    return "x".join(str(int(v)) for v in hw)


def _first_convs(model: nn.Module) -> tuple[str, ...]:
    convs = get_model_traits(model).get("first_conv") or getattr(model, "pretrained_cfg", {}).get("first_conv")
    if not convs:
        return ()
    return (convs,) if isinstance(convs, str) else tuple(convs)


def _resample_pos_embed(pos: torch.Tensor, model: nn.Module, where: str) -> tuple[torch.Tensor, str]:
    """Interpolate a ViT's absolute position embeddings to the model's grid; class/register tokens kept as is."""
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    side = math.isqrt(max(pos.shape[1] - prefix, 0))
    if grid is None or pos.ndim != 3 or side * side != pos.shape[1] - prefix:
        raise ArtifactError(f"{where}: pos_embed has shape {tuple(pos.shape)}, which is not a square grid of "
                            f"patches after {prefix} class/register token(s); the model expects "
                            f"{tuple(model.state_dict()['pos_embed'].shape)}")
    new = [int(v) for v in grid]
    resampled = resample_abs_pos_embed(pos, new_size=new, old_size=[side, side], num_prefix_tokens=prefix)
    return resampled, f"{side}x{side} -> {_size(new)}"


def _adapt_channels(weight: torch.Tensor, in_chans: int, key: str, where: str) -> tuple[torch.Tensor, str]:
    """RGB weights to ``in_chans`` channels with timm's ``adapt_input_conv``: summed for one channel (a grey
    image then gives what the RGB model gives for that image in grey), repeated and scaled for more."""
    have = int(weight.shape[1])
    if have != 3:
        raise ConfigError(f"{where}: the first layer {key} takes {have} channel(s) but the data has {in_chans} "
                          f"(data.channels={in_chans}); only 3-channel (RGB) weights can be adapted (summed for "
                          f"grey, repeated for more bands): set data.channels={have} or bring weights for "
                          f"{in_chans} channel(s)")
    adapted = adapt_input_conv(in_chans, weight)
    how = "summed" if in_chans == 1 else f"RGB repeated, scaled by 3/{in_chans}"
    return adapted, f"3 -> {in_chans} ({how})"


def load_fitted(model: nn.Module, state: dict[str, torch.Tensor], where: str, model_name: str) -> None:
    """Load ``state`` into ``model``; keys or shapes that do not fit are an ArtifactError naming ``where``, a
    few keys, and the likely cause."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ArtifactError(_mismatch(where, model_name, missing, unexpected, state, own))
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ArtifactError(f"{where}: {k} has shape {tuple(state[k].shape)} but backbone {model_name!r} expects "
                            f"{tuple(own[k].shape)} ({len(wrong)} weight(s) differ, e.g. {wrong[:3]}); likely "
                            f"another width or variant of the architecture: check backbone.name and "
                            f"backbone.kwargs")
    model.load_state_dict(state, strict=True)


def _mismatch(where: str, model_name: str, missing: list[str], unexpected: list[str],
              state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str:
    """The error for keys that do not fit, with the likely cause."""
    found, wanted = family_of_keys(state), family_of(model_name)
    head = (f"{where} does not fit backbone {model_name!r}: {len(missing)} weight(s) missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if found is not None and found.name != wanted.name:
        return (f"{head}; its keys are those of a {found.name} but {model_name!r} is a {wanted.name}: a checkpoint "
                f"of another architecture; set backbone.name to the one it was saved from")
    prefix = _common_prefix(unexpected, own)
    if prefix:
        return (f"{head}; its keys carry a prefix {prefix!r} that is not removed: save the backbone's own "
                f"state_dict, or nest it under 'backbone.'")
    return f"{head}; likely a checkpoint of another architecture or depth: check backbone.name"


def _common_prefix(unexpected: list[str], own: dict[str, torch.Tensor]) -> str | None:
    """A prefix such that ``prefix + key`` names most of the model's keys (e.g. ``encoder.``)."""
    for key in unexpected:
        for own_key in own:
            if key.endswith("." + own_key):
                prefix = key[: -len(own_key)]
                if sum(k.startswith(prefix) and k[len(prefix):] in own for k in unexpected) >= len(own) // 2:
                    return prefix
                break
    return None
