"""The run dir's lock, taken before Hydra writes anything there.

Hydra writes ``.hydra/`` (the composed config and the overrides) and its log file into the run dir before the
stage starts; a second run into a busy dir would replace the first run's overrides before the run record could
refuse it. Registered in ``configs/hydra/default.yaml`` (``hydra.callbacks``); the stage's run record then takes
the same lock again (re-entrant), and ``fmtransfer.cli`` releases whatever is still held when the process ends.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fmtransfer.errors import FmtError
from fmtransfer.lineage import lock

log = logging.getLogger(__name__)


def _folder(config: DictConfig, key: str) -> str | None:
    """The absolute path of ``config[key]`` as Hydra will use it; None if it cannot be resolved yet (a
    ``${hydra:...}`` interpolation: the stage's record locks the dir then)."""
    try:
        value = OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - any resolver may fail before Hydra's runtime config exists
        log.debug("%s cannot be resolved before the run starts; the run record locks it", key)
        return None
    return os.path.abspath(str(value)) if value else None


class LockRunDir(Callback):
    """Lock ``hydra.run.dir`` (a single run) or ``hydra.sweep.dir`` (a multirun; each job's record locks its own
    sub-dir) for the run's life."""

    def __init__(self) -> None:
        self._held: str | None = None

    def _acquire(self, config: DictConfig, key: str) -> None:
        folder = _folder(config, key)
        if folder is None:
            return
        stage = OmegaConf.select(config, "stage", default=None)
        try:
            held = lock.acquire(folder, stage)
        except FmtError as e:  # Hydra would print a traceback: the CLI's one line and exit status instead
            print(f"fmtransfer {stage}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if held:
            self._held = folder

    def _release(self) -> None:
        if self._held is not None:
            lock.release(self._held)
            self._held = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._acquire(config, "hydra.run.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._acquire(config, "hydra.sweep.dir")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()
