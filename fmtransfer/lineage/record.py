"""Run records (``run.json``): what a run read, what it wrote, and everything needed to trace it.

A record is written when the run starts (status ``running``), so a killed run still leaves a trace, and
rewritten atomically when it ends (``ok`` or ``failed``). While it is open the run dir is locked
(:mod:`fmtransfer.lineage.lock`): a second writer is refused. A record that replaces an earlier one in the same
run dir (a killed run resumed there) keeps it as a previous attempt.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fmtransfer.errors import ArtifactError
from fmtransfer.lineage import lock, registry
from fmtransfer.lineage.io import sha256_file, write_json_atomic

RUN_FILE = "run.json"
_TRACKED_PACKAGES = (
    "fmtransfer", "torch", "torchvision", "pytorch-lightning", "timm", "peft", "hydra-core", "omegaconf",
    "numpy", "faiss-cpu", "onnx", "onnxruntime", "scikit-learn", "mlxtend", "pillow", "safetensors",
)
# keys that say where a run writes, not what it computes
_UNHASHED_KEYS = ("run_dir",)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(cfg: DictConfig | dict) -> str:
    """sha256 of the resolved config, keys sorted, without the keys that only say where output goes."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    for key in _UNHASHED_KEYS:
        container.pop(key, None)
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the checkout that holds this package (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _artifact_entry(path: Path, role: str, base: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        shown = str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        shown = str(path.resolve())
    return {"role": role, "path": shown, "sha256": sha256_file(path), "bytes": path.stat().st_size}


class RunRecord:
    """The lineage record of one run, kept as ``<run_dir>/run.json``.

    Use as a context manager: the record is written at entry and finalised at exit, with ``status`` set to
    ``failed`` (and the error) if the block raised.
    """

    def __init__(self, stage: str, run_dir: str | Path, cfg: DictConfig | None = None):
        self.run_dir = Path(run_dir)
        self.data: dict[str, Any] = {
            "run_id": uuid.uuid4().hex,
            "stage": stage,
            "status": "running",
            "run_dir": str(self.run_dir.resolve()),
            "config_hash": config_hash(cfg) if cfg is not None else None,
            "git": git_state(),
            "packages": package_versions(),
            "data": None,
            "parents": [],
            "previous_attempts": [],
            "inputs": [],
            "outputs": [],
            "started": _now(),
            "ended": None,
        }
        self._previous: dict[str, Any] | None = None
        self._locked = False
        # where a successful run registers its artifacts: the config's `registry` key where a stage has one
        # (a path, null: the default, false: none), else $FMTRANSFER_REGISTRY or the default file
        self._registry = registry.resolve_path(cfg.get("registry") if cfg is not None else None)

    # --- building the record -------------------------------------------------------------------
    def add_input(self, path: str | Path, role: str) -> None:
        self.data["inputs"].append(_artifact_entry(Path(path), role, self.run_dir))

    def add_output(self, path: str | Path, role: str) -> None:
        self.data["outputs"].append(_artifact_entry(Path(path), role, self.run_dir))

    def add_parent(self, run_dir: str | Path) -> None:
        """Record an upstream run (its run.json must exist).

        This run's own dir names the attempt that ran there before (a killed run resumed in place), never this
        run itself; with no earlier attempt nothing is added.
        """
        if Path(run_dir).resolve() == self.run_dir.resolve():
            parent = self._previous
            if parent is None:
                return
        else:
            parent = load_record(run_dir)
        entry = {"run_id": parent["run_id"], "stage": parent["stage"], "run_dir": parent["run_dir"]}
        if entry not in self.data["parents"]:
            self.data["parents"].append(entry)

    def set_data(self, name: str, recipe: dict[str, Any], fingerprint: str, role: str = "data") -> None:
        """Record a data recipe (resolved) and the fingerprint of the content it produced."""
        entry = {"role": role, "recipe": name, "fingerprint": fingerprint, "spec": recipe}
        if self.data["data"] is None:
            self.data["data"] = []
        self.data["data"].append(entry)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    # --- writing -------------------------------------------------------------------------------
    def write(self) -> Path:
        """Write ``run.json``; the other ranks of a launched data-parallel job leave it to rank 0 (theirs would
        replace rank 0's, and list it as a previous attempt)."""
        path = self.run_dir / RUN_FILE
        if lock.launched_non_zero_rank():
            return path
        return write_json_atomic(path, self.data)

    def __enter__(self) -> RunRecord:
        self._locked = lock.acquire(self.run_dir, self.data["stage"])
        try:
            self._keep_previous()
            self.write()
        except BaseException:
            self._release()
            raise
        return self

    def _keep_previous(self) -> None:
        """An earlier record in this run dir (read under the lock) becomes a previous attempt of this one."""
        try:
            previous = json.loads((self.run_dir / RUN_FILE).read_text())
        except (OSError, ValueError):
            return
        if not isinstance(previous, dict) or not previous.get("run_id"):
            return
        self._previous = previous
        attempt = {k: previous.get(k) for k in ("run_id", "stage", "status", "started", "ended")}
        if previous.get("error"):
            attempt["error"] = previous["error"]
        self.data["previous_attempts"] = [*previous.get("previous_attempts", []), attempt]

    def _release(self) -> None:
        if self._locked:
            lock.release(self.run_dir)
            self._locked = False

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish(exc_type, exc)
        finally:
            self._release()

    def _finish(self, exc_type, exc) -> None:
        self.data["ended"] = _now()
        if exc_type is None:
            self.data["status"] = "ok"
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):  # Lightning turns Ctrl-C into SystemExit
            self.data["status"] = "interrupted"
        else:
            self.data["status"] = "failed"
            self.data["error"] = f"{exc_type.__name__}: {exc}"
        self.write()
        if exc_type is None and not lock.launched_non_zero_rank():
            registry.register_finished_run(self.data, self._registry)


def load_record(run_dir: str | Path) -> dict[str, Any]:
    """Read ``<run_dir>/run.json``; a clear error if it is missing or unreadable."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ArtifactError(f"{run_dir} is not an fmtransfer run directory: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})") from e


def verify_record(run_dir: str | Path) -> list[str]:
    """Recompute the sha256 of every output listed in run.json; return the problems found (empty: all good)."""
    run_dir = Path(run_dir)
    record = load_record(run_dir)
    problems = []
    for entry in record["outputs"]:
        path = Path(entry["path"])
        path = path if path.is_absolute() else run_dir / path
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from run.json")
    return problems
