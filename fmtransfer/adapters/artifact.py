"""Adapter files and applying them: one small safetensors file per region over one shared base.

The file holds only the adapter's tensors; its JSON header (method, config, the base's sha256, classes,
preprocessing, lineage, and the sha256 of the tensors) sits in the safetensors metadata, so a region ships as
one file. The header carries ``header_sha256``, the digest of its own canonical JSON (which includes the tensors'
sha256): an edited base, class list or method is refused like edited tensors. ``AdapterHost`` applies adapters in
turn to one loaded base, restoring it between them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fmtransfer.adapters.methods import AdapterMethod, method_from_description
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage.io import HEADER_DIGEST, atomic_path, seal_header, verify_header
from fmtransfer.models.classifier import Classifier

ADAPTER_FORMAT = "fmtransfer.adapter"
# 2: the header carries header_sha256 (version 1 headers were not hashed and are refused)
ADAPTER_FORMAT_VERSION = 2
ADAPTER_FILE = "adapter.safetensors"
_META_KEY = "fmtransfer"


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_adapter(path: str | Path, state: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Write tensors + sealed header atomically: the file is whole or absent."""
    header = seal_header({**header, "format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION,
                          "weights_sha256": tensors_sha256(state)})
    path = Path(path)
    check_header(header, path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={_META_KEY: json.dumps(header)})
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter file. Returns (header, tensors).

    Raises:
        ArtifactError: missing, truncated or not an adapter file, or tensors that differ from the header's hash.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise ArtifactError(f"adapter {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - truncated or not safetensors at all
        raise ArtifactError(f"adapter {path} cannot be read ({type(e).__name__}: {e}); truncated or not an "
                            f"adapter file") from e
    try:
        header = json.loads(metadata[_META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ArtifactError(f"{path} is a safetensors file but not an fmtransfer adapter (no header)") from None
    if not isinstance(header, dict) or header.get("format") != ADAPTER_FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ArtifactError(f"{path}: format {found!r} is not {ADAPTER_FORMAT!r}")
    _check_digest(header, path)
    check_header(header, path)
    if tensors_sha256(state) != header.get("weights_sha256"):
        raise ArtifactError(f"adapter {path}: its tensors do not match the sha256 in its header; the file was "
                            f"changed after it was written")
    header["path"] = str(path.resolve())
    return header, state


def _check_digest(header: dict[str, Any], path: Path) -> None:
    verify_header(header, f"adapter {path}", "base, classes, method, ...",
                  "re-create it with `fmtransfer adapt base=<its base> ...`")


# header entries every reader relies on: (key, type, what it is)
_REQUIRED = (("base", dict, "the base it was trained on: {sha256, path}"), ("method", dict, "the adapter method"),
             ("task", str, "classification or regression"), ("num_outputs", int, "the head's outputs"),
             ("preprocess", dict, "the base's preprocessing"), ("lineage", dict, "the run that wrote it"))


def check_header(header: dict[str, Any], path: str | Path) -> None:
    """Refuse a header that lacks an entry the loaders read, naming the file and the entry.

    Raises:
        ArtifactError: e.g. no ``base``, or a ``base`` without its ``sha256``.
    """
    for key, kind, what in _REQUIRED:
        if not isinstance(header.get(key), kind):
            raise ArtifactError(f"adapter {path}: its header has no valid {key!r} ({what}); got "
                                f"{header.get(key)!r}. Re-create it with `fmtransfer adapt`")
    if not isinstance(header["base"].get("sha256"), str):
        raise ArtifactError(f"adapter {path}: its header's base names no sha256 (base={header['base']!r}), so "
                            f"the base it was trained on cannot be checked")
    if "classes" not in header:
        raise ArtifactError(f"adapter {path}: its header has no 'classes' (null for regression)")


def adapted_meta(base_meta: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
    """A model header describing base + adapter (classes and head from the adapter)."""
    own = {k: v for k, v in base_meta.items() if k != HEADER_DIGEST}  # the base's digest covers the base's header
    return {**own, "classes": header["classes"], "num_outputs": header["num_outputs"], "task": header["task"],
            "adapter": {"method": header["method"]["name"], "path": header.get("path"),
                        "weights_sha256": header.get("weights_sha256"),
                        HEADER_DIGEST: header.get(HEADER_DIGEST)}}


class AdapterHost:
    """One loaded base model; region adapters applied to it in turn without reloading it.

    Args:
        model: the base model (modified in place while an adapter is applied).
        meta: the base's header (``load_model``'s second value).
    """

    def __init__(self, model: Classifier, meta: dict[str, Any]):
        self.model, self.base_meta = model, meta
        self._base_head = model.head
        self._method: AdapterMethod | None = None
        self._restore: dict[str, torch.Tensor] = {}
        self.header: dict[str, Any] | None = None

    @property
    def base_sha256(self) -> str:
        return self.base_meta["weights_sha256"]

    def apply(self, header: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Apply an adapter (after removing the current one). Returns the adapted model's header."""
        wanted = header["base"]["sha256"]
        if wanted != self.base_sha256:
            raise ArtifactError(f"adapter {header.get('path', '')} was trained on base {wanted[:12]}... "
                                f"({header['base'].get('path')}), but this base is {self.base_sha256[:12]}...; "
                                f"load the base it was trained on")
        self.reset()
        method = method_from_description(header["method"])
        before = self.model.state_dict()
        self.model.head = nn.Linear(self.model.embed_dim, int(header["num_outputs"]))
        try:
            method.attach(self.model, self.base_meta["backbone"]["name"])
        except ConfigError as e:
            self.model.head = self._base_head
            raise ArtifactError(f"adapter {header.get('path', '')} does not fit this base: {e}") from e
        self._method = method
        self._restore = {k: before[k].clone() for k in state if k in before and not k.startswith("head.")}
        own = self.model.state_dict()
        unknown = [k for k in state if k not in own]
        wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
        if unknown or wrong:
            self.reset()
            raise ArtifactError(f"adapter {header.get('path', '')} does not fit this base: "
                                f"{len(unknown)} unknown and {len(wrong)} mis-shaped tensors, e.g. {(unknown + wrong)[:3]}")
        self.model.load_state_dict(state, strict=False)
        self.model.eval()
        self.header = header
        return adapted_meta(self.base_meta, header)

    def reset(self) -> None:
        """Remove the applied adapter; the base is exactly as loaded."""
        if self._method is None:
            return
        self._method.detach(self.model)
        self.model.head = self._base_head
        if self._restore:
            self.model.load_state_dict(self._restore, strict=False)
        self._method, self._restore, self.header = None, {}, None

    def merge(self) -> tuple[Classifier, dict[str, Any]]:
        """Fold the applied adapter into plain weights. The host gives up its base: load a new one after this."""
        if self._method is None or self.header is None:
            raise ArtifactError("no adapter applied: nothing to merge")
        self._method.merge(self.model)
        meta = adapted_meta(self.base_meta, self.header)
        meta.update(self._method.merged_structure() or {})
        self._method = None
        return self.model, meta
