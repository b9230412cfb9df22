"""Loading what a stage runs: a model, or a base with an adapter applied (optionally merged into plain weights).

Every stage that reads a model (evaluate, merge, export, curate, adapt's base) goes through
:func:`load_model_or_adapted`, which also refuses what a run did not finish: a model or adapter whose run's
record (``run.json``) does not say ``ok``, e.g. the ``checkpoints/last.ckpt`` of a run killed mid-epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fmtransfer.adapters.artifact import AdapterHost, read_adapter
from fmtransfer.config import require
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage.record import RUN_FILE, load_record
from fmtransfer.models.classifier import Classifier, load_model, resolve_model_path

log = logging.getLogger(__name__)

_STATUS_MEANS = {"running": "still running, or killed before it could record its end",
                 "interrupted": "stopped by Ctrl-C or a signal", "failed": "failed"}


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


def allow_unfinished(cfg: DictConfig) -> bool:
    """The stage's ``allow_unfinished`` key (every stage that loads a model has it), checked to be a bool."""
    require(cfg, "allow_unfinished")
    value = cfg.allow_unfinished
    if not isinstance(value, bool):
        raise ConfigError(f"allow_unfinished={value!r}: expected true or false")
    return value


def producing_run(path: Path, meta: dict[str, Any]) -> Path | None:
    """The run dir whose record speaks for the artifact at ``path``, or None.

    The folder holding it (for a checkpoint, the folder holding ``checkpoints/``) when that has a run record;
    else the run its header names (``lineage.run_dir``), when that record is the same run (``run_id``).
    """
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (folder / RUN_FILE).is_file():
        return folder
    lineage = meta.get("lineage") or {}
    recorded = Path(lineage["run_dir"]) if lineage.get("run_dir") else None
    if recorded is not None and (recorded / RUN_FILE).is_file():
        if lineage.get("run_id") in (None, load_record(recorded).get("run_id")):
            return recorded
    return None


def check_finished(path: Path, meta: dict[str, Any], what: str, allow_unfinished: bool = False) -> None:
    """Refuse an artifact whose run did not finish (its record's status is not ``ok``).

    A checkpoint with no run record at all is refused too: a checkpoint is a snapshot taken during training, and
    nothing says that training ended. A model.json or adapter without a record is accepted: they are written
    only after training, and their headers are hashed.

    Args:
        path: the file read. meta: its header. what: the config key that named it (``model``, ``adapter``).
        allow_unfinished: warn instead of refusing.

    Raises:
        ArtifactError: naming the file, the run, its status and ``allow_unfinished=true``.
    """
    run = producing_run(path, meta)
    if run is None:
        if path.suffix != ".ckpt":
            return
        problem = (f"{what}={path} is a checkpoint with no run record (run.json) beside it or at the run its "
                   f"header names, so nothing says its training finished")
    else:
        record = load_record(run)
        status = record.get("status")
        if status == "ok":
            return
        error = f": {record['error']}" if record.get("error") else ""
        problem = (f"{what}={path} comes from run {run}, whose {RUN_FILE} says status {status!r} "
                   f"({_STATUS_MEANS.get(status, 'not finished')}{error}), not 'ok'")
    if allow_unfinished:
        log.warning("%s; used anyway (allow_unfinished=true)", problem)
        return
    raise ArtifactError(f"{problem}; use a finished run, or pass allow_unfinished=true to use it anyway")


def _load_checked(path: str | Path, what: str, allow_unfinished: bool) -> tuple[Path, Classifier, dict[str, Any]]:
    path = resolve_model_path(path)
    model, meta = load_model(path)
    check_finished(path, meta, what, allow_unfinished)
    return path, model, meta


def load_adapted(adapter: str | Path, model: str | Path | None = None, *, allow_unfinished: bool = False):
    """Base + adapter, ready to predict. ``model``: the base (default: the one the adapter file names).

    Returns:
        (host, adapted meta, base path, adapter header).
    """
    header, state = read_adapter(adapter)
    check_finished(Path(header["path"]), header, "adapter", allow_unfinished)
    if not model and not header["base"].get("path"):
        raise ArtifactError(f"adapter {header['path']} names no path for its base (header base={header['base']!r}); "
                            f"pass model=<the base it was trained on>")
    base_path, base, base_meta = _load_checked(model or header["base"]["path"], "model", allow_unfinished)
    host = AdapterHost(base, base_meta)
    meta = host.apply(header, state)
    return host, meta, base_path, header


def load_model_or_adapted(model: str | Path | None = None, adapter: str | Path | None = None, *,
                          merge: bool = False, allow_unfinished: bool = False) -> Loaded:
    """A model (run dir, model.json, .safetensors or .ckpt), or a base with an adapter file applied.

    Args:
        model: the model; under an adapter, the base (default: the one the adapter file names).
        adapter: an adapter file, or None.
        merge: fold the adapter into plain weights (the model then keeps no link to an :class:`AdapterHost`).
        allow_unfinished: use a model or adapter whose run did not finish (see :func:`check_finished`), with a
            warning.

    Raises:
        ConfigError: neither named. ArtifactError: unreadable or edited files, an adapter trained on another base,
        or an artifact of an unfinished run.
    """
    require_model_or_adapter(model, adapter)
    if not adapter:
        path, loaded, meta = _load_checked(model, "model", allow_unfinished)
        return Loaded(loaded, meta, path, meta)
    host, meta, path, header = load_adapted(adapter, model, allow_unfinished=allow_unfinished)
    if merge:
        merged, meta = host.merge()
        return Loaded(merged, meta, path, host.base_meta, header)
    return Loaded(host.model, meta, path, host.base_meta, header, host)
