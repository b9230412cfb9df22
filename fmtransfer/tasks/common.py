"""What every stage does: output folders, loggers, trainers, checkpoints, scores."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from fmtransfer.config import build, run_dir, to_plain  # noqa: F401 - run_dir: re-exported for the stages
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage import RunRecord, write_text_atomic
from fmtransfer.lineage.io import publish
from fmtransfer.lineage.record import RUN_FILE
from fmtransfer.metrics import classification_metrics, regression_metrics

if TYPE_CHECKING:
    from fmtransfer.adapters.loading import Loaded
    from fmtransfer.data import Recipe

log = logging.getLogger(__name__)


def resolve_precision(precision: Any) -> Any:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def build_logger(cfg: DictConfig):
    node = cfg.get("logger")
    if not node or "_target_" not in node:
        return False
    if "WandbLogger" in str(node["_target_"]):
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
    return build(node, "logger")


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files appear whole: written beside, then renamed into place.

    A run killed while saving keeps its previous ``last.ckpt`` intact.
    """

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            publish(partial, filepath)
        trainer.strategy.barrier("atomic_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    keys = sorted({k for row in rows for k in row})  # Lightning's CSVLogger writes its columns sorted too
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


@contextlib.contextmanager
def metrics_history(out: Path, resuming: bool) -> Iterator[None]:
    """Around a resumed ``trainer.fit``: the rows earlier attempts logged in this run dir's ``logs/metrics.csv``
    stay in it, in front of the new ones.

    Lightning's CSVLogger deletes that file when it starts. The earlier rows are set aside first in
    ``logs/metrics.earlier.csv`` (so a resumed run killed in turn still has them there for the next resume) and put
    back when training ends, however it ends. A run that is not resuming starts its log afresh, as before.
    """
    current = out / "logs" / "metrics.csv"
    earlier = current.with_name("metrics.earlier.csv")
    if not resuming or not (current.is_file() or earlier.is_file()):
        yield
        return
    _write_rows(earlier, _read_rows(earlier) + _read_rows(current))
    current.unlink(missing_ok=True)
    try:
        with warnings.catch_warnings():  # its warning that earlier logs will be deleted is not so here
            warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted")
            yield
    finally:
        _write_rows(current, _read_rows(earlier) + _read_rows(current))
        earlier.unlink()


class TrainThroughput(pl.Callback):
    """Training images per second of each epoch (data loading, forward, backward, step; no validation)."""

    def __init__(self) -> None:
        self.per_epoch: list[float] = []
        self._start = 0.0
        self._images = 0
        self._end = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[0])
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._images:
            self.per_epoch.append(self._images / max(1e-9, self._end - self._start))


def checkpoint_callback(cfg: DictConfig, folder: Path, every_n_epochs: int = 1) -> AtomicModelCheckpoint:
    """``last.ckpt`` every ``every_n_epochs`` epochs, plus the best by ``checkpoint.monitor`` if one is set."""
    ck = cfg.get("checkpoint") or {}
    monitor = ck.get("monitor")
    return AtomicModelCheckpoint(dirpath=folder, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                                 monitor=monitor, mode=ck.get("mode", "min"),
                                 save_top_k=ck.get("save_top_k", 1) if monitor else 0, save_last=True,
                                 every_n_epochs=every_n_epochs, enable_version_counter=False)


def build_augment(cfg: DictConfig):
    """The ``augment`` group's transform, or None (``augment=none``)."""
    node = cfg.get("augment")
    return build(node, "augment") if node and "_target_" in node else None


def extra_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    node = cfg.get("callbacks") or {}
    return [build(v, f"callbacks.{k}") for k, v in node.items() if v is not None]


def deterministic_mode(value: Any) -> bool | str:
    """The ``deterministic`` switch as Lightning's Trainer takes it.

    Args:
        value: true (torch's deterministic algorithms: an op that has none raises), "warn" (it warns instead),
            false or null.

    Raises:
        ConfigError: any other value.
    """
    if value == "warn":
        return value
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ConfigError(f"deterministic={value!r}; expected true, false or warn")


def build_trainer(cfg: DictConfig, *, callbacks: list, logger, default_root_dir: Path) -> pl.Trainer:
    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    node["precision"] = resolve_precision(node.get("precision", "auto"))
    if node.get("deterministic") is None:  # a trainer.deterministic of the user's own wins
        # never None: Lightning then leaves torch's process-wide flag as an earlier stage of this process set it
        node["deterministic"] = deterministic_mode(cfg.get("deterministic"))
    for key in ("limit_train_batches", "limit_val_batches"):
        if node.get(key) is None:
            node.pop(key, None)
    trainer = build(node, "trainer", callbacks=callbacks, logger=logger, default_root_dir=str(default_root_dir))
    _check_launched(trainer, cfg.get("stage", "<stage>"))
    return trainer


def _check_launched(trainer: pl.Trainer, stage: str) -> None:
    """Several processes must be started by a launcher (torchrun, SLURM's srun): Lightning's own relaunch re-runs
    the command line it was started with, which for `fmtransfer <stage>` is not a script it can run (the second
    process died with "can't open file 'fmtransfer-<stage>'" and the first was killed)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size > 1 and environment is not None and not environment.creates_processes_externally:
        processes = trainer.world_size // max(1, trainer.num_nodes)
        raise ConfigError(f"trainer.devices={processes} (x trainer.num_nodes={trainer.num_nodes}) asks for "
                          f"{trainer.world_size} processes: start them with a launcher, e.g. `torchrun "
                          f"--nproc-per-node={processes} -m fmtransfer {stage} ...` (or srun under SLURM); "
                          f"trainer.devices=1 runs one process")


def resolve_resume(resume: str | None) -> Path | None:
    """``resume=<ckpt or run dir>`` -> the checkpoint to continue from (None: a fresh run)."""
    if not resume:
        return None
    path = Path(resume).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "pretrain" / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                return check_checkpoint(candidate, f"resume={resume}")
        raise ArtifactError(f"resume={resume}: no checkpoints/last.ckpt in that run dir (did the run finish "
                            f"its first epoch?)")
    if not path.is_file():
        raise ArtifactError(f"resume={resume}: no such checkpoint file or run dir")
    return check_checkpoint(path, f"resume={resume}")


# the checkpoint key under which a run stores its setup (SetupFingerprint), for resume= to compare
SETUP_KEY = "fmtransfer_setup"
# recipe keys that only say where the data is read from or which files are skipped: the content fingerprint
# (ids, bytes, labels, regions, splits) stands for what they produce
_DATA_LOCATION_KEYS = ("source", "description", "max_skipped_fraction", "max_pixels")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = value


def setup_fingerprint(cfg: DictConfig, keys: Sequence[str], recipe: Recipe, data_fingerprint: str,
                      **facts: Any) -> dict[str, Any]:
    """What makes two trainings the same run, as ``{dotted key: value}``: the resolved config under ``keys``, the
    data recipe (without where it is read from) and its content fingerprint, and ``facts`` (e.g. the base's sha256).

    A checkpoint stores it (:class:`SetupFingerprint`); ``resume=`` compares it with the resuming run's own
    (:func:`check_resume_setup`).
    """
    flat: dict[str, Any] = {}
    for key in keys:
        _flatten(key, to_plain(OmegaConf.select(cfg, key)), flat)
    data = {k: v for k, v in recipe.to_dict().items() if k not in _DATA_LOCATION_KEYS}
    _flatten("data", data, flat)
    flat["data.fingerprint"] = data_fingerprint
    flat.update(facts)
    return flat


class SetupFingerprint(pl.Callback):
    """Stores the run's setup fingerprint and id in every checkpoint it writes (``checkpoint[SETUP_KEY]``)."""

    def __init__(self, setup: dict[str, Any], run_id: str) -> None:
        self.setup, self.run_id = dict(setup), run_id

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[SETUP_KEY] = {"setup": self.setup, "run_id": self.run_id}


def _shown(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ABSENT = object()


def check_resume_setup(checkpoint: Path, setup: dict[str, Any], force: bool, what: str) -> list[str]:
    """Compare the setup stored in ``checkpoint`` with this run's ``setup``.

    Continuing a checkpoint of another seed, split, data, learning rate or model continues another run: with
    another split seed, the new test split holds samples the checkpoint trained on.

    Args:
        checkpoint: a checkpoint that :func:`check_checkpoint` accepted.
        setup: this run's :func:`setup_fingerprint`.
        force: warn and go on instead of refusing (``resume_force=true``).
        what: the config key and value that named the checkpoint, for messages.

    Returns:
        The keys that differ (empty: the same setup); ``["(not recorded)"]`` for a checkpoint holding none.

    Raises:
        ConfigError: a difference (listed: key, the checkpoint's value, this run's) or no stored setup, unless
            ``force``.
    """
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(checkpoint))
    stored = stored.get(SETUP_KEY) if isinstance(stored, dict) else None
    if not isinstance(stored, dict) or not isinstance(stored.get("setup"), dict):
        problem = (f"{what}: {checkpoint} holds no record of its run's setup (written before fmtransfer stored "
                   f"one), so nothing shows that it continues this run")
        _refuse_or_warn(problem, force)
        return ["(not recorded)"]
    old = stored["setup"]
    differ = sorted(k for k in old.keys() | setup.keys() if old.get(k, _ABSENT) != setup.get(k, _ABSENT))
    if differ:
        shown = "; ".join(f"{k}={_shown(old.get(k, _ABSENT))} there, {_shown(setup.get(k, _ABSENT))} here"
                          for k in differ[:8])
        more = f"; and {len(differ) - 8} more" if len(differ) > 8 else ""
        problem = (f"{what}: {checkpoint} was written by a run set up differently: {shown}{more}. Continuing it "
                   f"would mix two runs (with another split, the test split holds samples the checkpoint trained "
                   f"on)")
        _refuse_or_warn(problem, force)
    return differ


def record_training_inputs(record: RunRecord, cfg: DictConfig, resume: Path | None, setup: dict[str, Any],
                           checkpoint: str | None) -> None:
    """What a training stage starts from, in its record: the brought backbone weights and the checkpoint it
    resumes (after :func:`check_resume_setup`, so a checkpoint of another setup stops the run before it trains),
    with that checkpoint's run as a parent."""
    if resume is not None:
        record.set("resume_differs", check_resume_setup(resume, setup, bool(cfg.resume_force), f"resume={cfg.resume}"))
    if checkpoint:
        record.add_input(checkpoint, "backbone_checkpoint")
    if resume is not None:
        record.add_input(resume, "resumed_from")
        record.set("resumed_from", str(resume))
        if (resume.parent.parent / RUN_FILE).is_file():
            record.add_parent(resume.parent.parent)


def _refuse_or_warn(problem: str, force: bool) -> None:
    if not force:
        raise ConfigError(f"{problem}; resume with the checkpoint's settings, start afresh without resume=, or "
                          f"pass resume_force=true to resume it anyway")
    log.warning(f"{problem}; resuming anyway (resume_force=true)")


def check_checkpoint(path: Path, what: str) -> Path:
    """``path`` if a weights-only load accepts it (nothing but tensors and plain containers), before Lightning
    reads it; memory-mapped where the format allows, so a large checkpoint is not read twice.

    Raises:
        ArtifactError: not a checkpoint, or one holding objects a safe load refuses (e.g. a pickled payload).
    """
    mmap = zipfile.is_zipfile(path)  # torch's current format; the legacy one cannot be memory-mapped
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a file it will not load
        raise ArtifactError(f"{what}: {path} is not a safe checkpoint: a weights-only load refuses it "
                            f"({_refusal(e)}); resume only from checkpoints fmtransfer wrote") from None
    return path


def _refusal(e: Exception) -> str:
    """The line of torch's refusal that says what was refused (its first lines explain how to load the file
    unsafely, which is not advice to pass on)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    why = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    why = why.removeprefix("WeightsUnpickler error: ").split(" Please use")[0]  # drop the allowlisting advice
    return f"{type(e).__name__}: {why}"


def score(task: str, outputs: np.ndarray, targets: np.ndarray, num_classes: int | None) -> dict[str, Any]:
    """Metrics of one set of outputs: classification (accuracy, macro-F1, confusion) or regression."""
    if task == "classification":
        return classification_metrics(outputs.argmax(1), targets, num_classes)
    return regression_metrics(outputs[:, 0], targets)


def score_by_region(task: str, outputs: np.ndarray, targets: np.ndarray, regions: np.ndarray,
                    num_classes: int | None) -> dict[str, Any]:
    """``{"overall": metrics, "regions": {region: metrics}}``."""
    result: dict[str, Any] = {"overall": score(task, outputs, targets, num_classes), "regions": {}}
    for region in sorted(set(regions.tolist())):
        mask = regions == region
        result["regions"][region] = score(task, outputs[mask], targets[mask], num_classes)
    return result


def model_run_dir(model_path: Path, meta: dict[str, Any]) -> Path | None:
    """The run that produced a model: recorded in its header, else the folder holding it if it is a run dir."""
    recorded = meta.get("lineage", {}).get("run_dir")
    for candidate in ([Path(recorded)] if recorded else []) + [model_path.parent, model_path.parent.parent]:
        if (candidate / RUN_FILE).is_file():
            return candidate
    return None


def record_sources(record: RunRecord, loaded: Loaded, role: str | None = None) -> None:
    """Record the model file read (role ``role``, by default ``model``, or ``base`` under an adapter) and the
    adapter file, and the runs that produced them as parents."""
    header = loaded.adapter
    record.add_input(loaded.path, role or ("base" if header else "model"))
    parents = [model_run_dir(loaded.path, loaded.base_meta)]
    if header is not None:
        record.add_input(header["path"], "adapter")
        parents.append(Path(header["lineage"]["run_dir"]))
    for parent in parents:
        if parent is not None and (parent / RUN_FILE).is_file():
            record.add_parent(parent)
