"""Loading what a stage runs: a model, or a base with an adapter applied (optionally merged into plain weights).

Every stage that reads a model (evaluate, merge, export, curate, adapt's base) goes through
:func:`load_model_or_adapted`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmtransfer.adapters.artifact import AdapterHost, read_adapter
from fmtransfer.errors import ConfigError
from fmtransfer.models.classifier import Classifier, load_model, resolve_model_path


@dataclass
class Loaded:
    """What :func:`load_model_or_adapted` read.

    Attributes:
        model: ready to predict (eval mode): the model, the base with the adapter applied, or the merged model.
        meta: the header describing ``model`` (with an adapter: its classes, head and method).
        path: the model file read (the base under an adapter).
        base_meta: that file's own header (``meta`` itself without an adapter).
        adapter: the adapter file's header, or None.
        host: the :class:`AdapterHost` holding the base while an adapter is applied (None otherwise).
    """

    model: Classifier
    meta: dict[str, Any]
    path: Path
    base_meta: dict[str, Any]
    adapter: dict[str, Any] | None = None
    host: AdapterHost | None = None


def require_model_or_adapter(model: str | Path | None, adapter: str | Path | None) -> None:
    """Raise ConfigError unless a model or an adapter file (or both) is named."""
    if not model and not adapter:
        raise ConfigError("pass model=<run dir or model file> and/or adapter=<adapter file>")


def load_adapted(adapter: str | Path, model: str | Path | None = None):
    """Base + adapter, ready to predict. ``model``: the base (default: the one the adapter file names).

    Returns:
        (host, adapted meta, base path, adapter header).
    """
    header, state = read_adapter(adapter)
    base_path = resolve_model_path(model or header["base"]["path"])
    base, base_meta = load_model(base_path)
    host = AdapterHost(base, base_meta)
    meta = host.apply(header, state)
    return host, meta, base_path, header


def load_model_or_adapted(model: str | Path | None = None, adapter: str | Path | None = None, *,
                          merge: bool = False) -> Loaded:
    """A model (run dir, model.json, .safetensors or .ckpt), or a base with an adapter file applied.

    Args:
        model: the model; under an adapter, the base (default: the one the adapter file names).
        adapter: an adapter file, or None.
        merge: fold the adapter into plain weights (the model then keeps no link to an :class:`AdapterHost`).

    Raises:
        ConfigError: neither named. ArtifactError: unreadable files, or an adapter trained on another base.
    """
    require_model_or_adapter(model, adapter)
    if not adapter:
        path = resolve_model_path(model)
        loaded, meta = load_model(path)
        return Loaded(loaded, meta, path, meta)
    host, meta, path, header = load_adapted(adapter, model)
    if merge:
        merged, meta = host.merge()
        return Loaded(merged, meta, path, host.base_meta, header)
    return Loaded(host.model, meta, path, host.base_meta, header, host)
