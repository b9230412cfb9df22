"""A backbone with a head, and the model artifact format (``model.safetensors`` + ``model.json``).

``model.json`` records the weights file's sha256 and ``header_sha256``, the digest of its own canonical JSON: edited
classes, preprocessing or architecture are refused like edited weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fmtransfer.data.preprocess import Preprocess
from fmtransfer.errors import ArtifactError
from fmtransfer.lineage.io import (
    atomic_path,
    seal_header,
    sha256_file,
    verify_header,
    write_json_atomic,
)
from fmtransfer.models.backbone import BackboneSpec, create_backbone, read_state_dict, weights_record
from fmtransfer.models.vpt import PromptedViT

MODEL_FORMAT = "fmtransfer.model"
# 2: model.json carries header_sha256 (version 1 headers were not hashed and are refused)
MODEL_FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
# the task of a model without a head (num_outputs 0): a self-supervised backbone whose output is its embedding
EMBEDDING_TASK = "embedding"


class NoHead(nn.Module):
    """The place of the head in a model without one: passes the embedding through, holds no weights.

    ``in_features`` and ``out_features`` (0) read like an ``nn.Linear``'s, so code that sizes a new head from the
    old one (``adapt``) works unchanged.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features, self.out_features = int(in_features), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Classifier(nn.Module):
    """``backbone`` features -> linear ``head`` (class logits, or one value for regression).

    With ``num_outputs=0`` the head is a :class:`NoHead`: a self-supervised backbone, whose output is its
    embedding, until ``adapt`` gives it a head.
    """

    def __init__(self, backbone: nn.Module, num_outputs: int):
        super().__init__()
        self.backbone = backbone
        dim = backbone.num_features
        self.head = nn.Linear(dim, num_outputs) if num_outputs > 0 else NoHead(dim)

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.num_features)

    @property
    def num_outputs(self) -> int:
        """Head width; 0 without a head."""
        return int(self.head.out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, embed_dim)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def has_head(meta: dict[str, Any]) -> bool:
    """Whether a model header describes a model with a head (``num_outputs`` 0: a head-less backbone)."""
    return int(meta["num_outputs"]) > 0


def model_meta(model: Classifier, spec: BackboneSpec, *, task: str, classes: list[str] | None,
               preprocess: Preprocess, **lineage: Any) -> dict[str, Any]:
    """The JSON header that makes a weights file usable on its own; a head-less model's task is
    ``EMBEDDING_TASK`` whatever ``task`` says, and it has no classes."""
    headless = model.num_outputs == 0
    return {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "backbone": spec.architecture(),
            "backbone_weights": weights_record(model.backbone),
            "embed_dim": model.embed_dim, "task": EMBEDDING_TASK if headless else task,
            "classes": None if headless else classes, "num_outputs": model.num_outputs,
            "preprocess": preprocess.to_dict(), "lineage": lineage}


def save_model(model: Classifier, meta: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """Write ``model.safetensors`` then ``model.json`` (with the weights' sha256, sealed), each atomically."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": MODEL_FORMAT})
    meta = seal_header({**meta, "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
                        "weights": WEIGHTS_FILE, "weights_sha256": sha256_file(weights)})
    return weights, write_json_atomic(folder / META_FILE, meta)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The model header stored in a Lightning checkpoint by :class:`SupervisedModule` (weights_only load)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"cannot read checkpoint {path} safely ({type(e).__name__}: {e})") from e
    meta = ckpt.get("fmtransfer") if isinstance(ckpt, dict) else None
    if not meta:
        raise ArtifactError(f"checkpoint {path} was not written by fmtransfer (no 'fmtransfer' header); "
                            f"use it as backbone.checkpoint=... instead")
    return meta


def resolve_model_path(path: str | Path) -> Path:
    """A run dir, model.json, model.safetensors or Lightning .ckpt -> the file to load."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / META_FILE, path / "pretrain" / META_FILE, path / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise ArtifactError(f"{path} holds no model: expected {META_FILE} (a pretrain run dir), "
                            f"pretrain/{META_FILE} (a pipeline run dir) or checkpoints/last.ckpt")
    if path.suffix == ".safetensors":
        path = path.with_name(META_FILE) if path.name == WEIGHTS_FILE else path.with_suffix(".json")
    if not path.is_file():
        raise ArtifactError(f"model {path} does not exist")
    if path.suffix.lower() == ".onnx":
        raise ArtifactError(f"model={path} is an ONNX file; this stage reads PyTorch models and adapters (a run dir, "
                            f"{META_FILE}, {WEIGHTS_FILE} or a .ckpt); use `fmtransfer predict model={path}` to run "
                            f"an exported model")
    return path


def load_model(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Load a model artifact (see ``resolve_model_path``); weights are checked against the header's sha256.

    Returns:
        (model in eval mode, its meta dict).
    """
    path = resolve_model_path(path)
    if path.suffix == ".ckpt":
        meta = {**read_checkpoint_meta(path), "weights_sha256": sha256_file(path)}
        state = {k.removeprefix("model."): v for k, v in read_state_dict(path).items()
                 if k.startswith("model.")}
    else:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # ValueError: invalid JSON, and UnicodeDecodeError of a binary file
            raise ArtifactError(f"model={path} is not a model: expected a run dir, {META_FILE}, {WEIGHTS_FILE} or "
                                f"a .ckpt, but it is not a readable JSON header ({type(e).__name__})") from e
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ArtifactError(f"{path} is not an fmtransfer model header (format={found!r})")
        check_model_header(meta, path)
        weights = path.parent / meta["weights"]
        if not weights.is_file():
            raise ArtifactError(f"{path} names weights {weights}, which do not exist")
        digest = sha256_file(weights)
        if digest != meta["weights_sha256"]:
            raise ArtifactError(f"{weights}: sha256 {digest[:12]}... differs from {meta['weights_sha256'][:12]}... "
                                f"recorded in {path}; the file was changed or truncated")
        state = read_state_dict(weights)
    model = build_classifier(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not fit the recorded architecture ({e})") from e
    return model.eval(), meta


def check_model_header(meta: dict[str, Any], path: str | Path) -> None:
    """Refuse a ``model.json`` whose header is not the one it was written with, or was never hashed.

    Raises:
        ArtifactError: naming the file, and how to re-create it for a header written before headers were hashed.
    """
    verify_header(meta, f"model {path}", "classes, preprocessing, architecture, ...",
                  "re-create it (`fmtransfer pretrain`, or `fmtransfer merge` for a merged adapter)")


def build_classifier(meta: dict[str, Any]) -> Classifier:
    """An untrained :class:`Classifier` with the architecture recorded in ``meta``."""
    spec = BackboneSpec(**meta["backbone"])
    backbone = create_backbone(spec)
    if meta.get("prompts"):  # a merged visual-prompt-tuned ViT keeps its prompts
        backbone = PromptedViT(backbone, **meta["prompts"])
    return Classifier(backbone, int(meta["num_outputs"]))
