"""The registry's artifacts as W&B artifacts, with the same lineage edges, when the user is logged in to W&B.

Logged in: an API key in ``WANDB_API_KEY`` or in the netrc file that ``wandb login`` writes, and W&B not switched
off (``WANDB_MODE=offline|disabled``). Otherwise nothing is imported, nothing is logged and nothing prompts.

A run that registered outputs becomes one W&B run (job type: its stage) that *uses* its parents' artifacts and
*logs* its outputs: W&B's lineage graph then has the registry's edges. Files are logged as references
(``file://`` URIs with their sha256 in the metadata): nothing is uploaded, a team's storage stays where it is.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

_OFF_MODES = ("offline", "disabled", "dryrun")


def logged_in() -> bool:
    """Whether W&B is installed, on, and has credentials (never prompts for them)."""
    if os.environ.get("WANDB_MODE", "").lower() in _OFF_MODES:
        return False
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return False
    if importlib.util.find_spec("wandb") is None:
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def artifact_name(artifact: Any) -> str:
    """One W&B artifact name per kind and region, so each new sha256 is a new version of it."""
    tail = artifact.region or artifact.short
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{artifact.kind}-{tail}")


def to_wandb(artifact: Any, parents: list[tuple[Any, str]] = ()) -> Any:
    """A registry row as a ``wandb.Artifact``: a reference to its file, its sha256, region, metrics and parents."""
    import wandb

    art = wandb.Artifact(artifact_name(artifact), type=artifact.kind,
                         metadata={"sha256": artifact.sha256, "region": artifact.region, "name": artifact.name,
                                   "run_dir": artifact.run_dir, "metrics": artifact.metrics,
                                   "parents": [{"sha256": p.sha256, "kind": p.kind, "role": r} for p, r in parents]})
    if artifact.path and Path(artifact.path).is_file():
        art.add_reference(Path(artifact.path).resolve().as_uri(), name=Path(artifact.path).name)
    return art


def log_run(reg: Any, record: dict[str, Any], made: list[str], mode: str | None = None) -> str:
    """Log one run's registered outputs and the parents they were made from; returns the W&B run's id."""
    import wandb

    outputs = [a for a in (reg.get(s) for s in made) if a is not None]
    parents = {p.sha256: p for a in outputs for p, _ in reg.parents(a.sha256) if p.sha256 not in made}
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fmtransfer"), job_type=record.get("stage", "registry"),
                     name=f"{record.get('stage')}-{str(record.get('run_id'))[:8]}", mode=mode,
                     config={"run_dir": record.get("run_dir"), "run_id": record.get("run_id")},
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        if not run.offline:  # W&B records a used artifact only online; offline the parents are in the metadata
            for parent in parents.values():
                run.use_artifact(to_wandb(parent), aliases=[f"sha256-{parent.short}"])
        for artifact in outputs:
            run.log_artifact(to_wandb(artifact, reg.parents(artifact.sha256)),
                             aliases=["latest", f"sha256-{artifact.short}"])
        return run.id
    finally:
        run.finish()
