"""The pipeline's settings and its steps: what ``pipeline``, its regions and its report share.

A step is a stage run of its own in a sub-folder of the pipeline's run dir. :class:`Steps` composes each step's config
from the stage's entry config, runs it with what earlier steps produced (or reuses an earlier run of it:
``tasks/step_cache.py``), and keeps its result. A region's steps sit in ``regions/<name>/`` when the pipeline has
several regions (``regions=[...]``), at the top level for the one region of ``region=``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from fmtransfer.adapters.regional import REGIONAL_METHODS
from fmtransfer.config import build_dataclass, compose_stage, require, to_plain
from fmtransfer.errors import ConfigError
from fmtransfer.lineage import RunRecord
from fmtransfer.tasks import step_cache
from fmtransfer.tasks.adapt import adapt
from fmtransfer.tasks.curate import curate
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.export import GateFailed, export
from fmtransfer.tasks.monitor import monitor
from fmtransfer.tasks.plan import plan
from fmtransfer.tasks.pretrain import pretrain
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)

STAGE_FUNCTIONS: dict[str, Callable[[DictConfig], StageResult]] = {
    "pretrain": pretrain, "evaluate": evaluate, "curate": curate, "adapt": adapt, "plan": plan, "export": export,
    "monitor": monitor}
# what the global pretraining takes from the pipeline's config (the pipeline's groups are its groups)
TRAINING_KEYS = ("seed", "deterministic", "data", "backbone", "method", "augment", "trainer", "logger", "loader",
                 "resume", "resume_force", "checkpoint", "callbacks")
# the settings a region of ``regions=[...]`` may set for itself (the pipeline's own are its defaults)
REGION_KEYS = ("adapter", "calibration", "sweep", "adapt_overrides", "regional_pretrain", "new_classes_score",
               "export_region_model", "monitor_region")


@dataclass(frozen=True)
class Sweep:
    """``sweep``: the adapt runs (every adapter at every size) that feed the plan."""

    sizes: list[int]
    adapters: list[str]


@dataclass(frozen=True)
class RegionCalibration:
    """``calibration``: the region's adapter is the run of ``adapter`` at ``size``."""

    size: int
    strategy: str


@dataclass(frozen=True)
class RegionalSwitch:
    """``regional_pretrain``: the region's adapter again at every sweep size, after ``epochs`` of regional DINO
    pretraining (0: off)."""

    epochs: int

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"regional_pretrain.epochs={self.epochs} must be >= 0 (0: off)")


# adapt keys the pipeline sets itself for the runs with regional pretraining (and leaves unset for the others)
_REGIONAL_KEYS = ("regional_pretrain.epochs", "regional_pretrain.reuse", "regional_pretrain.compare")


@dataclass(frozen=True)
class RegionFit:
    """How the region's labels relate to the global model's, read from both recipes before anything trains.

    Attributes:
        global_recipe, region_recipe: the recipes' names.
        global_task, region_task: classification or regression.
        global_classes, region_classes: each recipe's class list (None for regression).
        region_train: the size of the region's train split (where calibration labels come from).
    """

    global_recipe: str
    region_recipe: str
    global_task: str
    region_task: str
    global_classes: list[str] | None
    region_classes: list[str] | None
    region_train: int

    @property
    def zero_shot(self) -> bool:
        """The global head can score the region: the same task and (classification) every region class is one of
        the global model's."""
        if self.region_task != self.global_task:
            return False
        return self.region_task != "classification" or set(self.region_classes) <= set(self.global_classes)

    @property
    def new_classes(self) -> list[str]:
        """The region's classes the global model does not predict (all of them for another task)."""
        if self.region_task != self.global_task or self.region_classes is None:
            return list(self.region_classes or [])
        return [c for c in self.region_classes if c not in set(self.global_classes or [])]

    def why_no_zero_shot(self) -> str:
        """Why the global head cannot score the region, in a sentence (for the log and the report)."""
        if self.region_task != self.global_task:
            return (f"region {self.region_recipe!r} is a {self.region_task} task and the global model "
                    f"({self.global_recipe!r}) a {self.global_task} one")
        new = self.new_classes
        shown = ", ".join(new[:10]) + (", ..." if len(new) > 10 else "")
        return (f"{len(new)} of the {len(self.region_classes)} classes of region {self.region_recipe!r} ({shown}) are "
                f"not among the global model's {len(self.global_classes)} ({', '.join(self.global_classes[:10])}"
                f"{', ...' if len(self.global_classes) > 10 else ''}), so its head cannot score them")


@dataclass(frozen=True)
class PipelineSettings:
    """The pipeline's own keys (configs/pipeline.yaml, which holds their defaults); the groups it passes on
    are checked as its steps' settings.

    Attributes:
        adapter: the region's adapter method.
        calibration: the region's calibration size and strategy (for every adapt run).
        sweep: the adapt runs that feed the plan.
        adapt_overrides: extra ``adapt`` overrides for every adapt run.
        export_region_model: export the region's model (ONNX fp32 + INT8, gated).
        monitor_region: monitor the region (current) against the global val split (reference) with the global model.
        curate_global: curate the global set with the global model's embeddings.
        curate_with: another model whose embeddings curate instead (e.g. a self-supervised run), or None.
        pretrain_curated: pretrain a second model on the curated subset.
        pretrain_curated_steps: equal (as many optimisation steps as the full pretraining) or epochs (as many
            epochs).
        regional_pretrain: the region's adapter with regional pretraining too, for the with / without comparison.
        new_classes_score: for a region the global head cannot score (classes of its own): linear or knn, a probe of
            the global model's frozen embeddings fitted on the region adapter's calibration labels and scored
            where zero-shot would be; none: no score.
        reuse: reuse a step that finished before with the same inputs (``tasks/step_cache.py``).
        rerun: steps to run again even so (their names as in report.md's Stages, or ``all``).
    """

    adapter: str
    calibration: RegionCalibration
    sweep: Sweep
    adapt_overrides: list[str]
    export_region_model: bool
    monitor_region: bool
    curate_global: bool
    curate_with: str | None
    pretrain_curated: bool
    pretrain_curated_steps: Literal["equal", "epochs"]
    regional_pretrain: RegionalSwitch
    new_classes_score: Literal["linear", "knn", "none"]
    reuse: bool
    rerun: list[str]

    def __post_init__(self) -> None:
        if not self.regional_pretrain.epochs:
            return
        if self.adapter not in REGIONAL_METHODS:
            raise ConfigError(f"regional_pretrain.epochs={self.regional_pretrain.epochs} needs the region's adapter to "
                              f"be {' or '.join(REGIONAL_METHODS)}, not adapter={self.adapter}")
        for override in self.adapt_overrides:
            if override.split("=")[0].lstrip("+~") in _REGIONAL_KEYS:
                raise ConfigError(f"adapt_overrides: {override!r} would apply to every adapt run; set the pipeline's "
                                  f"regional_pretrain.epochs instead (the runs with regional pretraining are its own)")

    def regional_runs(self) -> list[tuple[str, int]]:
        """(adapter, size) of the runs with regional pretraining: the region's adapter at every size."""
        if not self.regional_pretrain.epochs:
            return []
        sizes = dict.fromkeys([*(int(n) for n in self.sweep.sizes), self.calibration.size])
        return [(self.adapter, n) for n in sizes]

    def adapt_runs(self) -> list[tuple[str, int]]:
        """(adapter, size) of every adapt run: the sweep, plus the region's own if not in it."""
        runs = [(a, int(n)) for a in self.sweep.adapters for n in self.sweep.sizes]
        if (self.adapter, self.calibration.size) not in runs:
            runs.append((self.adapter, self.calibration.size))
        return runs


def pipeline_settings(cfg: DictConfig) -> PipelineSettings:
    names = [f.name for f in PipelineSettings.__dataclass_fields__.values()]
    require(cfg, *names)
    return build_dataclass(PipelineSettings, {k: to_plain(cfg[k]) for k in names}, "")




@dataclass(frozen=True)
class Region:
    """One region of the pipeline: its data recipe, its settings (the pipeline's, with its own on top) and its fit
    to the global model.

    Attributes:
        name: its folder under ``regions/``; empty for the pipeline's one region (``region=``), whose steps sit at
            the top level of the run dir.
        data: the region's data recipe (a plain mapping).
        settings: the pipeline's settings with the region's own (``regions[i].<key>``, :data:`REGION_KEYS`).
        fit: the region against the global data (classes, task, train split), read before anything trains.
        where: the config key it came from, named in errors.
    """

    name: str
    data: dict[str, Any]
    settings: PipelineSettings
    fit: RegionFit
    where: str = "region"

    def step(self, name: str) -> str:
        """The region's step ``name`` (``adapt/...``, ``plan``, ``export``, ...) as the pipeline names it."""
        return f"regions/{self.name}/{name}" if self.name else name

    @property
    def label(self) -> str:
        """How the log and the report name the region."""
        return self.name or self.fit.region_recipe

    def adapt_step(self, adapter: str, size: int) -> str:
        return self.step(f"adapt/{self.settings.adapt_runs().index((adapter, size))}_{adapter}_n{size}")

    def regional_step(self, adapter: str, size: int) -> str:
        """In a folder of their own: ``plan`` reads ``adapt/``, one curve per method, without these runs."""
        return self.step(f"adapt_regional/{self.settings.regional_runs().index((adapter, size))}_{adapter}_n{size}")

    @property
    def released_step(self) -> str:
        """The adapt step of the region's own adapter (``adapter`` at ``calibration.size``): the one exported."""
        return self.adapt_step(self.settings.adapter, self.settings.calibration.size)


class Steps:
    """The pipeline's steps. ``compose`` builds a step's config from its stage's entry config plus overrides and
    the nodes the pipeline passes on, writing into ``<pipeline run dir>/<name>``; ``run`` runs it with what
    earlier steps produced and records it as a parent of the pipeline's run."""

    def __init__(self, out: Path, regions: Sequence[Region], reuse: bool = False, rerun: Sequence[str] = ()) -> None:
        self.out = out
        self.regions = list(regions)
        self.configs: dict[str, DictConfig] = {}
        self.results: dict[str, StageResult] = {}
        self.record: RunRecord | None = None
        self.skipped: dict[str, str] = {}  # step -> why it does not run (said in the log and the report)
        self.notes: dict[str, str] = {}  # step -> how it runs otherwise than usual (said in the log and the report)
        self.reuse, self.rerun = reuse, set(rerun)
        self.keys: dict[str, str] = {}  # step -> the digest of what it made (its outputs' sha256)
        self.folders: dict[str, list[Path]] = {}  # step -> its folder here and the run dir it is (a reused one)
        self.reused: dict[str, Path] = {}  # step -> the earlier run it reused
        self.fingerprints: dict[bytes, str] = {}  # recipe node -> its data fingerprint, taken once a run

    @property
    def fit(self) -> RegionFit:
        """The region's fit, for a pipeline of one region."""
        if len(self.regions) != 1:
            raise ValueError(f"the pipeline has {len(self.regions)} regions; read steps.regions[i].fit")
        return self.regions[0].fit

    def compose(self, name: str, stage: str, overrides: Sequence[str] = (),
                nodes: Mapping[str, Any] | None = None) -> DictConfig:
        sub = compose_stage(stage, list(overrides))
        for key, value in {**(nodes or {}), "run_dir": str(self.out / name)}.items():
            sub[key] = value
        self.configs[name] = sub
        return sub

    def run(self, name: str, produced: Mapping[str, Any] | None = None) -> StageResult:
        sub = self.configs[name]
        for key, value in (produced or {}).items():
            OmegaConf.update(sub, key, value, merge=False, force_add=True)
        key = inputs = None
        if self.reuse:
            key, inputs = step_cache.step_key(sub, self.keys, self.folders, base=self.out, memo=self.fingerprints)
            earlier = None if self.wants_rerun(name) else step_cache.recall(key)
            if earlier is not None:
                step_cache.link(self.out / name, earlier.run_dir)
                log.info("pipeline: %s reused from %s: nothing it reads changed", name, earlier.run_dir)
                self.reused[name] = earlier.run_dir
                return self._keep(name, earlier, key)
        target = self.out / name
        if target.is_symlink():  # reused last time, runs now: never write into the earlier run
            target.unlink()
        try:
            result = STAGE_FUNCTIONS[sub.stage](sub)
        except GateFailed as e:  # a rejected export is a step that ran: kept and recorded, then the failure goes on
            self._keep(name, e.result)
            raise
        if key is not None:
            step_cache.remember(key, inputs, result)
        return self._keep(name, result, key)

    def _keep(self, name: str, result: StageResult, key: str | None = None) -> StageResult:
        if key is not None:
            self.keys[name] = step_cache.made(result.run_dir)
            self.folders[name] = [self.out / name, Path(result.run_dir)]
        self.record.add_parent(result.run_dir)
        self.results[name] = result
        return result

    def wants_rerun(self, name: str) -> bool:
        """``rerun`` names the step, a folder of steps that holds it (``adapt``, ``regions/<name>``) or ``all``."""
        return any(r == "all" or name == r or name.startswith(r.rstrip("/") + "/") for r in self.rerun)

    def check_rerun(self) -> None:
        unknown = sorted(r for r in self.rerun - {"all"}
                         if not any(n == r or n.startswith(r.rstrip("/") + "/") for n in self.configs))
        if unknown:
            raise ConfigError(f"rerun={sorted(self.rerun)}: no step named {', '.join(unknown)}; the steps are: "
                              f"{', '.join(self.configs)} (or a folder of them, such as adapt, or all)")
