"""``pipeline``: the main job. Global pretraining -> evaluation on the global test split and zero-shot on a
region (for a region with classes of its own, a new crop, a probe of the global model's frozen embeddings on the
adapter's calibration labels instead) -> curation of the global set (and pretraining on the curated subset) -> a sweep of regional adapters -> a
calibration-size plan -> the region's model exported to ONNX (fp32 + INT8, gated) -> ``report.md``.

Each step is a stage run of its own in a sub-folder (with its run.json): its config is composed from the stage's
own entry config (``configs/<stage>.yaml``) plus what the pipeline passes on, every step's config is composed and
checked before anything trains, and the report is assembled from the steps' results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from fmtransfer.adapters import check_method_fits
from fmtransfer.adapters.harm import DoNoHarmRefused, describe, unchecked
from fmtransfer.adapters.regional import REGIONAL_METHODS
from fmtransfer.config import build_dataclass, compose_stage, require, to_plain
from fmtransfer.data import Recipe, build_datamodule, check_fit, load_recipe
from fmtransfer.errors import ConfigError
from fmtransfer.lineage import RunRecord
from fmtransfer.monitoring.drift import NEEDS
from fmtransfer.tasks import step_cache
from fmtransfer.tasks.adapt import adapt, validate_adapt
from fmtransfer.tasks.common import run_dir
from fmtransfer.tasks.curate import curate, curation_settings
from fmtransfer.tasks.evaluate import evaluate, evaluation_protocol
from fmtransfer.tasks.export import GateFailed, export, export_settings
from fmtransfer.tasks.monitor import MonitorSettings, monitor
from fmtransfer.tasks.plan import plan
from fmtransfer.tasks.pretrain import epochs_for_steps, pretrain, validate
from fmtransfer.tasks.pretrain_dino import is_self_supervised
from fmtransfer.tasks.report import metric_rows, results_table, write_report
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)

STAGE_FUNCTIONS: dict[str, Callable[[DictConfig], StageResult]] = {
    "pretrain": pretrain, "evaluate": evaluate, "curate": curate, "adapt": adapt, "plan": plan, "export": export,
    "monitor": monitor}
# what the global pretraining takes from the pipeline's config (the pipeline's groups are its groups)
TRAINING_KEYS = ("seed", "deterministic", "data", "backbone", "method", "augment", "trainer", "logger", "loader",
                 "resume", "resume_force", "checkpoint", "callbacks")


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


def region_fit(cfg: DictConfig) -> RegionFit:
    """Read both recipes' tables (their labels checked against their own class lists) and the region's fit to the
    global model's input (channels): the checks that need the data, before anything trains."""
    global_recipe, region_recipe = load_recipe(cfg.data), load_recipe(cfg.region)
    global_table = build_datamodule(global_recipe, cfg.loader).prepare()
    region_dm = build_datamodule(region_recipe, cfg.loader)
    region_table = region_dm.prepare()
    _check_channels(region_recipe, global_recipe)
    return RegionFit(global_recipe.name, region_recipe.name, global_recipe.task, region_recipe.task,
                     global_table.classes, region_table.classes, region_dm.split_size("train"))


def _check_channels(region: Recipe, global_recipe: Recipe) -> None:
    """The global model reads images with the global recipe's channels: the region's must convert to them."""
    try:  # num_outputs 0: the task is the zero-shot decision's (RegionFit), not an error here
        check_fit(region, {"num_outputs": 0, "preprocess": {"channels": global_recipe.channels}})
    except ConfigError as e:
        raise ConfigError(f"region: {e} (the global recipe {global_recipe.name!r}'s channels)") from None


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


class Steps:
    """The pipeline's steps. ``compose`` builds a step's config from its stage's entry config plus overrides and
    the nodes the pipeline passes on, writing into ``<pipeline run dir>/<name>``; ``run`` runs it with what
    earlier steps produced and records it as a parent of the pipeline's run."""

    def __init__(self, out: Path, fit: RegionFit, reuse: bool = False, rerun: Sequence[str] = ()) -> None:
        self.out = out
        self.fit = fit
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
            key, inputs = step_cache.step_key(sub, self.keys, self.folders, base=self.out,
                                                 memo=self.fingerprints)
            earlier = None if {name, "all"} & self.rerun else step_cache.recall(key)
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

    def check_rerun(self) -> None:
        unknown = sorted(self.rerun - set(self.configs) - {"all"})
        if unknown:
            raise ConfigError(f"rerun={sorted(self.rerun)}: no step named {', '.join(unknown)}; the steps are: "
                              f"{', '.join(self.configs)} (or all)")


def pipeline(cfg: DictConfig) -> StageResult:
    """Run the stages in order; see the module docstring. Everything that can fail is checked before pretraining;
    a rejected export is reported, then fails the run."""
    out = run_dir(cfg)
    settings = pipeline_settings(cfg)
    steps = compose_steps(cfg, settings, out)
    _check(steps, settings)
    for name, why in steps.skipped.items():
        log.warning("pipeline: %s skipped: %s", name, why)
    for name, how in steps.notes.items():
        log.warning("pipeline: %s: %s", name, how)
    with RunRecord("pipeline", out, cfg) as record:
        steps.record = record
        rejected = _run(steps, settings)
        result = _report(steps, settings, record, rejected)
        if rejected is not None:
            raise rejected
    return result


def _nodes(cfg: DictConfig, *keys: str, resolve: bool = True) -> dict[str, Any]:
    """The pipeline's values of ``keys``; unresolved ones keep interpolations such as ``${run_dir}`` for the step."""
    node = {k: cfg[k] for k in keys}
    return {k: OmegaConf.to_container(v, resolve=resolve) if isinstance(v, (DictConfig, ListConfig)) else v
            for k, v in node.items()}


def _adapt_step(settings: PipelineSettings, adapter: str, size: int) -> str:
    return f"adapt/{settings.adapt_runs().index((adapter, size))}_{adapter}_n{size}"


def _regional_step(settings: PipelineSettings, adapter: str, size: int) -> str:
    """In a folder of their own: ``plan`` reads ``adapt/``, one curve per method, without these runs."""
    return f"adapt_regional/{settings.regional_runs().index((adapter, size))}_{adapter}_n{size}"


def compose_steps(cfg: DictConfig, settings: PipelineSettings, out: Path, fit: RegionFit | None = None) -> Steps:
    """Every step's config, composed before anything runs.

    Args:
        fit: the region against the global data (default: read from both recipes, :func:`region_fit`).
    """
    require(cfg, "region", "split", "accelerator", "export", "curation", "force", *TRAINING_KEYS)
    fit = fit or region_fit(cfg)
    for adapter in dict.fromkeys(a for a, _ in settings.adapt_runs()):  # first: an unknown one has no config
        try:
            check_method_fits(adapter, cfg.backbone.name)
        except ConfigError as e:
            raise ConfigError(f"sweep.adapters / adapter: {e}") from None
    steps = Steps(out, fit, settings.reuse, settings.rerun)
    region = {"data": to_plain(cfg.region)}
    steps.compose("pretrain", "pretrain", nodes=_nodes(cfg, *TRAINING_KEYS, resolve=False))
    _compose_zero_shot(steps, cfg, settings, region)
    if settings.monitor_region:  # the recipes themselves: a region of one's own need not be a named recipe
        monitor = steps.compose("monitor", "monitor", nodes={**_nodes(cfg, "seed", "accelerator", "loader"),
                                                             "reference": to_plain(cfg.data),
                                                             "current": to_plain(cfg.region)})
        if not fit.zero_shot:
            _monitor_new_classes(steps, monitor)
    if settings.curate_global:
        curate = steps.compose("curate", "curate", nodes=_nodes(cfg, "seed", "accelerator", "data", "loader",
                                                                "curation"))
        curate.base = settings.curate_with  # None: the global model, once trained
        if settings.pretrain_curated:
            steps.compose("pretrain_curated", "pretrain", nodes=_nodes(cfg, *TRAINING_KEYS, resolve=False))
    def adapt_overrides(adapter: str, size: int, checked: bool = False) -> list[str]:
        # the do-no-harm check costs K extra fits: only the region's adapter (the one exported) gets it, also when
        # adapt_overrides sets do_no_harm.folds (that sets the region adapter's check, not the sweep's)
        return [f"adapter={adapter}", f"calibration.size={size}", f"calibration.strategy={settings.calibration.strategy}",
                f"seed={cfg.seed}", *settings.adapt_overrides, *([] if checked else ["do_no_harm.folds=0"])]

    # the adapter the pipeline releases; with export_region_model=false nothing is released, and nothing is checked
    region_run = (settings.adapter, settings.calibration.size) if settings.export_region_model else None

    adapt_nodes = {**region, **_nodes(cfg, "logger", "deterministic", resolve=False)}
    for adapter, size in settings.adapt_runs():
        steps.compose(_adapt_step(settings, adapter, size), "adapt",
                      adapt_overrides(adapter, size, (adapter, size) == region_run), nodes=adapt_nodes)
    for i, (adapter, size) in enumerate(settings.regional_runs()):
        # the first run pretrains; the others take its pretraining (the same base, method, data and seed)
        first = out / _regional_step(settings, *settings.regional_runs()[0])
        regional = f"regional_pretrain.epochs={settings.regional_pretrain.epochs}" if i == 0 else \
            f"regional_pretrain.reuse={first}"
        # compare=false: the run without it is the sweep's own
        steps.compose(_regional_step(settings, adapter, size), "adapt",
                      [*adapt_overrides(adapter, size), regional, "regional_pretrain.compare=false"], nodes=adapt_nodes)
    steps.compose("plan", "plan", nodes={"sweep": str(out / "adapt")})
    if settings.export_region_model:
        steps.compose("export", "export", nodes={**_nodes(cfg, "seed", "loader", "export", "force"), **region})
    steps.check_rerun()
    return steps


def _compose_zero_shot(steps: Steps, cfg: DictConfig, settings: PipelineSettings, region: dict[str, Any]) -> None:
    """``zero_shot``: the global head on the region; for a region it cannot score, ``probe`` (its frozen embeddings
    with the region adapter's calibration labels, ``new_classes_score``) or nothing, said in ``steps.skipped``."""
    fit, nodes = steps.fit, {**_nodes(cfg, "seed", "split", "accelerator", "loader"), **region}
    if fit.zero_shot:
        steps.compose("zero_shot", "evaluate", nodes=nodes)
        return
    score = settings.new_classes_score
    if score != "none" and fit.region_task == "classification":
        steps.compose("probe", "evaluate", [f"protocol={score}"], nodes=nodes)  # data.subset: the calibration set
        steps.skipped["zero-shot"] = (f"{fit.why_no_zero_shot()}; in its place a {_PROBE_NAMES[score]} on the "
                                      f"global model's frozen embeddings, fitted on the region adapter's "
                                      f"{settings.calibration.size} calibration labels, scored on the region's "
                                      f"{cfg.split} split")
    else:
        reason = "new_classes_score=none" if score == "none" else f"a probe scores classes, not a {fit.region_task} target"
        steps.skipped["zero-shot"] = f"{fit.why_no_zero_shot()}; no score in its place ({reason})"


_PROBE_NAMES = {"linear": "logistic-regression probe", "knn": "kNN vote"}


def _monitor_new_classes(steps: Steps, monitor: DictConfig) -> None:
    """A region the global head cannot score: its images are still compared with the global data through the global
    model's embeddings (MMD, domain classifier, OOD scores), but tests on the head's class probabilities would only
    say that the region is not made of the global classes: they are left out, said in ``steps.notes``."""
    tests = list(monitor.monitor.tests)
    kept, dropped = [t for t in tests if NEEDS.get(t) != "probs"], [t for t in tests if NEEDS.get(t) == "probs"]
    if not kept and not monitor.monitor.ood.enabled:
        del steps.configs["monitor"]
        steps.skipped["monitoring"] = (f"{steps.fit.why_no_zero_shot()}; monitor.tests={tests} are all tests on the "
                                       f"global head's class probabilities and the OOD scores are off")
        return
    monitor.monitor.tests = kept
    left_out = f"the tests on the head's class probabilities ({', '.join(dropped)}) are left out, and " if dropped \
        else ""
    steps.notes["monitoring"] = (f"{steps.fit.why_no_zero_shot()}: {left_out}the region's labels are not read (the "
                                 f"head has no accuracy on classes it lacks). The embedding tests "
                                 f"({', '.join(kept) or 'none'}) and the OOD scores compare the region's images with "
                                 f"the global data as the global model sees them")


def _check(steps: Steps, settings: PipelineSettings) -> None:
    """Every step's own checks, and the sizes against the data: all that can fail, before anything trains."""
    configs = steps.configs
    if is_self_supervised(configs["pretrain"]):  # its zero-shot score, report and curated pretraining read a head
        method = "jepa" if "jepa" in configs["pretrain"].method else "dino"
        raise ConfigError(f"pipeline method={method}: the pipeline scores the global model's head, and a "
                          f"self-supervised model has none; run fmtransfer pretrain method={method}, then evaluate "
                          f"model=<run> protocol=knn, curate base=<run> and adapt base=<run> on their own")
    validate(configs["pretrain"])
    for name in configs:
        if name.startswith(("adapt/", "adapt_regional/")):
            validate_adapt(configs[name])
    fit = steps.fit
    too_big = sorted({n for _, n in settings.adapt_runs() if n > fit.region_train})
    if too_big:
        raise ConfigError(f"sweep.sizes / calibration.size {too_big} exceed the train split of region "
                          f"{fit.region_recipe!r} ({fit.region_train} samples)")
    if "probe" in configs:
        evaluation_protocol(configs["probe"], load_recipe(configs["probe"].data))
    if "export" in configs:
        export_settings(configs["export"])
        _check_release(configs[_adapt_step(settings, settings.adapter, settings.calibration.size)],
                       configs["export"].force)
    if "monitor" in configs:
        MonitorSettings.from_cfg(configs["monitor"].monitor)
    if settings.curate_with and not settings.curate_global:
        raise ConfigError(f"curate_with={settings.curate_with!r} names the model that curates the global set, but "
                          f"curate_global=false: set curate_global=true, or drop curate_with")
    if settings.curate_with and not Path(settings.curate_with).exists():
        raise ConfigError(f"curate_with={settings.curate_with!r}: no such file or folder; give the model whose "
                          f"embeddings curate the global set (a run dir, model.json or .ckpt), or null for the "
                          f"global model")
    if "curate" in configs:
        curation = configs["curate"].curation
        curated = curation_settings(configs["curate"])
        global_pool = build_datamodule(load_recipe(configs["curate"].data), configs["curate"].loader).split_size(
            curation.split)
        curated.target(global_pool)
        if curated.levels[0] > global_pool:
            raise ConfigError(f"curation.levels={curated.levels}: k={curated.levels[0]} is larger than the "
                              f"{global_pool} samples of the global {curation.split} split")


def _check_release(region_adapt: DictConfig, force: bool) -> None:
    """An adapter whose do-no-harm check cannot run is refused by export unless force=true: said before training."""
    if not region_adapt.do_no_harm.folds and force is not True:
        raise ConfigError("adapt_overrides sets do_no_harm.folds=0 for the region's adapter: it would not be checked "
                          "against its base, and export refuses an unchecked adapter after the whole run; drop the "
                          "override, set force=true to export it anyway, or export_region_model=false")


def _run(steps: Steps, settings: PipelineSettings) -> GateFailed | DoNoHarmRefused | None:
    """The stages in order, each with what the earlier ones produced; a rejected export (or an adapter refused for
    not beating its base) is returned."""
    pre = steps.run("pretrain")
    if "zero_shot" in steps.configs:
        steps.run("zero_shot", {"model": str(pre.run_dir)})
    if "monitor" in steps.configs:
        steps.run("monitor", {"model": str(pre.run_dir)})
    if "curate" in steps.configs:
        curated = steps.run("curate", {} if settings.curate_with else {"base": str(pre.run_dir)})
        if "pretrain_curated" in steps.configs:
            produced: dict[str, Any] = {"data.subset": str(curated.outputs["manifest"])}
            if settings.pretrain_curated_steps == "equal":  # as many optimisation steps as `pre`
                batch_size = steps.configs["pretrain_curated"].loader.batch_size
                produced["trainer.max_epochs"] = epochs_for_steps(pre.metrics["global_step"],
                                                                  curated.metrics["selected"], batch_size)
            steps.run("pretrain_curated", produced)
    for name in [n for n in steps.configs if n.startswith(("adapt/", "adapt_regional/"))]:
        steps.run(name, {"base": str(pre.run_dir)})
    if "probe" in steps.configs:  # the same labels as the region's adapter: its calibration set is the probe's train
        region = steps.results[_adapt_step(settings, settings.adapter, settings.calibration.size)]
        steps.run("probe", {"model": str(pre.run_dir), "data.subset": str(region.outputs["calibration"])})
    steps.run("plan")
    if "export" in steps.configs:
        region = steps.results[_adapt_step(settings, settings.adapter, settings.calibration.size)]
        try:
            steps.run("export", {"adapter_file": str(region.outputs["adapter"])})
        except (GateFailed, DoNoHarmRefused) as e:  # report everything first, then fail
            return e
    return None


def _report(steps: Steps, settings: PipelineSettings, record: RunRecord,
            rejected: GateFailed | DoNoHarmRefused | None) -> StageResult:
    """``report.md`` from the steps' results: tables, their sections, pictures and the stages' folders."""
    results = steps.results
    pre, planned = results["pretrain"], results["plan"]
    zero = results.get("zero_shot") or results.get("probe")  # the global model on the region, if scored
    region = results[_adapt_step(settings, settings.adapter, settings.calibration.size)]
    curated, curated_pre, exported = results.get("curate"), results.get("pretrain_curated"), results.get("export")
    monitored = results.get("monitor")
    regional = {size: (results[_adapt_step(settings, adapter, size)], results[_regional_step(settings, adapter, size)])
                for adapter, size in settings.regional_runs()}
    sections = [("Setup", _setup(pre, zero, region, steps)),
                ("Results", _results(pre, curated, curated_pre, zero, region,
                                     regional.get(settings.calibration.size, (None, None))[1])),
                *([("Regional pretraining", _regional_section(regional, pre.metrics["task"]))] if regional else []),
                *([("Monitoring: the region against the global data", _monitor_section(monitored, steps))]
                  if monitored else []),
                *([("Monitoring: the region against the global data",
                    f"**Skipped**: {steps.skipped['monitoring']}.")] if "monitoring" in steps.skipped else []),
                ("Do no harm", _harm_section(region, rejected if isinstance(rejected, DoNoHarmRefused) else None)),
                *(curated.sections if curated else []), *planned.sections]
    if exported is not None:
        sections += [(heading, body if rejected is None else f"**Rejected**: {rejected}\n\n{body}")
                     for heading, body in exported.sections]
    sections.append(("Stages", "\n".join(
        [f"- pretrain: `{pre.run_dir}`",
         "- zero-shot: " + (f"`{zero.run_dir}`" if "zero_shot" in results else "skipped, the global head cannot "
                            "score the region (see Setup)") + (f"; {_probe_label(zero)}: `{zero.run_dir}`"
                                                               if "probe" in results else ""),
         *([f"- monitoring: `{monitored.run_dir}`"] if monitored else []),
         *(["- monitoring: skipped (see its section)"] if "monitoring" in steps.skipped else []),
         *([f"- curation: `{curated.outputs['manifest']}`"] if curated else []),
         f"- region adapter: `{region.outputs['adapter']}`", f"- adaptation sweep: `{steps.out / 'adapt'}`",
         *([f"- with regional pretraining: `{steps.out / 'adapt_regional'}`"] if regional else []),
         f"- plan: `{planned.run_dir}`",
         *(["- edge export: refused, the adapter does not beat its base (force=true overrides)"]
           if isinstance(rejected, DoNoHarmRefused) else []),
         *([f"- edge export: rejected, `{exported.run_dir / 'rejected'}`" if rejected is not None
            else f"- edge export: `{exported.outputs['model']}`"] if exported else []),
         *([f"- reused, nothing they read changed ({len(steps.reused)} of {len(steps.results)} steps; "
            f"`rerun=[<step>]` runs one again): " + ", ".join(f"{n} (`{p}`)" for n, p in steps.reused.items())]
           if steps.reused else [])])))
    am = region.metrics
    images = [("Global test split", pre.outputs.get("confusion")),
              *([(f"{_probe_label(zero).capitalize() if 'probe' in results else 'Zero-shot'} on "
                  f"{zero.metrics['recipe']}", zero.outputs.get("confusion"))] if zero else []),
              ("Training curves", pre.outputs.get("training_curves")),
              (f"{am['method']} adapter on {am['recipe']}", region.outputs.get("confusion")),
              ("Accuracy against local labels", planned.outputs.get("learning_curve"))]
    if curated:
        images += [("Curation: cluster sizes", curated.outputs.get("cluster_sizes")),
                   ("Curation: PCA map", curated.outputs.get("pca"))]
    if monitored:
        images += [("Monitoring: OOD scores, global reference against the region", monitored.outputs.get("ood_plot"))]
    released = exported.outputs.get("model") if exported and rejected is None else region.outputs.get("adapter")
    images.append(("Lineage: the region's model back to its data (the registry)",
                   _lineage_picture(released, steps.out / "lineage.png")))
    report = write_report(steps.out / "report.md", title="fmtransfer pipeline report", run=record.data,
                          sections=sections, images=[(c, p) for c, p in images if p is not None])
    record.add_output(report, "report")
    return StageResult("pipeline", steps.out, outputs={"report": report}, sections=sections,
                       steps={**results, "adapt": region})


def _lineage_picture(artifact: Path | None, path: Path) -> Path | None:
    """The registry's lineage graph of ``artifact`` (the released ONNX, else the region's adapter) from the registry
    the steps registered into (``$FMTRANSFER_REGISTRY`` or the default), or None with a log line when there is none
    or it does not know the file."""
    from fmtransfer.lineage.registry import Registry, resolve_path
    from fmtransfer.tasks.registry import lineage_png, lineage_tree

    where = resolve_path(None)
    if artifact is None or where is None or not where.is_file():
        return None
    try:
        with Registry(where) as reg:
            _, nodes, edges = lineage_tree(reg, reg.find(str(artifact)))
            return lineage_png(nodes, edges, path)
    except Exception as e:  # noqa: BLE001 - the report goes on without the picture
        log.warning("pipeline: no lineage picture in report.md (%s: %s)", type(e).__name__, e)
        return None


def _monitor_section(monitored: StageResult, steps: Steps) -> str:
    """The monitor's own section, after what the pipeline changed in it (a region with classes of its own)."""
    body = _without_images(monitored.sections[0][1])
    return f"**Region with classes of its own**: {steps.notes['monitoring']}.\n\n{body}" \
        if "monitoring" in steps.notes else body


def _without_images(markdown: str) -> str:
    """A step's report section without its pictures (their links are relative to the step's own folder, and the
    pipeline's report shows the pictures itself), its headings one level down, inside the pipeline's section."""
    return "\n".join(f"#{line}" if line.startswith("#") else line for line in markdown.splitlines()
                     if not line.lstrip().startswith("!["))


def _harm_section(region: StageResult, refused: DoNoHarmRefused | None) -> str:
    """The region's adapter against its base on the calibration set (adapt's do_no_harm), and what export made of
    it."""
    harm = region.metrics.get("do_no_harm") or unchecked("no do_no_harm record")
    body = f"The region's adapter against its base: {describe(harm)}."
    if harm.get("checked"):
        body += (f" Interval: {harm['interval_method']}. beats_base is true only when the whole interval lies above "
                 f"0 (docs/do_no_harm.md).")
    if refused is not None:
        body += f"\n\n**Not exported**: {refused}"
    return body


def _probe_label(probe: StageResult) -> str:
    """What the probe step is, for the report's rows and captions."""
    return f"frozen embeddings + {_PROBE_NAMES[probe.metrics['protocol']]}"


def _setup(pre: StageResult, zero: StageResult | None, region: StageResult, steps: Steps) -> str:
    pm, am = pre.metrics, region.metrics
    data = pm["data"]
    if "zero_shot" in steps.results:
        scored = (f", then scored without any adaptation on `{zero.metrics['recipe']}` ({zero.metrics['overall']['n']} "
                  f"{zero.metrics['split']} images).")
    else:  # plainly: no zero-shot, and what stands in for it
        scored = f". **No zero-shot score**: {steps.skipped['zero-shot']}."
    return (f"Backbone `{pm['backbone']}` trained on `{pm['recipe']}` ({data['splits']['train']} train / "
            f"{data['splits']['val']} val / {data['splits']['test']} test images) for {pm['epochs']} epochs in "
            f"{pm['fit_seconds']:.0f} s ({pm['train_images_per_s']['median'] or 0:.0f} images/s){scored} "
            f"The region's adapter (`{am['method']}`, {am['calibration']['size']} {am['calibration']['strategy']} "
            f"labels from the region's train split) trains {am['trainable_fraction']:.2%} of the parameters "
            f"and is one {am['adapter_bytes'] / 1e6:.2f} MB file ({am['adapter_to_base']:.1%} of the base).")


def _results(pre: StageResult, curated: StageResult | None, curated_pre: StageResult | None,
             zero: StageResult | None, region: StageResult, region_regional: StageResult | None = None) -> str:
    pm, am = pre.metrics, region.metrics
    rows = metric_rows(f"global {pm['backbone']}", pm["recipe"], "test", pm["test"])
    if curated and curated_pre:
        cm = curated_pre.metrics
        rows += metric_rows(f"global {pm['backbone']}, curated {curated.metrics['fraction']:.0%} of the train split "
                            f"({cm['global_step']} steps vs {pm['global_step']})", pm["recipe"], "test", cm["test"])
    if zero is not None and zero.metrics.get("protocol", "head") != "head":  # the probe, in zero-shot's place
        zm = zero.metrics
        rows += metric_rows(f"global {pm['backbone']}, {_probe_label(zero)} on the "
                            f"{am['calibration']['size']} calibration labels (no zero-shot: new classes)",
                            zm["recipe"], zm["split"], zm)
    elif zero is not None:
        zm = zero.metrics
        rows += metric_rows(f"global {pm['backbone']}, zero-shot", zm["recipe"], zm["split"], zm)
    rows += metric_rows(f"+ {am['method']} adapter, {am['calibration']['size']} labels", am["recipe"], "test",
                        am["test"])
    if region_regional is not None:
        rm = region_regional.metrics
        rows += metric_rows(f"+ {rm['method']} adapter, {rm['calibration']['size']} labels, after regional "
                            f"pretraining ({rm['regional_pretrain']['epochs']} DINO epochs)", rm["recipe"], "test",
                            rm["test"])
    return results_table(rows, pm["task"])


def _regional_section(runs: dict[int, tuple[StageResult, StageResult]], task: str) -> str:
    """The region's adapter without and with regional pretraining at every size, what it cost, and whether it
    helped."""
    key = "accuracy" if task == "classification" else "r2"
    lines = [f"| adapter | labels | test {key} without | with regional pretraining | change | adapter MB without | "
             f"with |", "|---|---:|---:|---:|---:|---:|---:|"]
    worse = []
    for size, (without, with_) in sorted(runs.items()):
        a, b = without.metrics["test"]["overall"][key], with_.metrics["test"]["overall"][key]
        worse += [size] if b < a else []
        lines.append(f"| {with_.metrics['method']} | {size} | {a:.4f} | {b:.4f} | {b - a:+.4f} | "
                     f"{without.metrics['adapter_bytes'] / 1e6:.3f} | {with_.metrics['adapter_bytes'] / 1e6:.3f} |")
    first = runs[min(runs)][1].metrics["regional_pretrain"]
    knn = first["feature_knn_val"]
    cost = (f"DINO on the region's {first['images']} train images, labels unused: {first['epochs']} epochs, "
            f"{first['steps']} steps, {first['seconds']:.0f} s, {first['trainable_parameters']} parameters trained "
            f"(the adapter's own + {first['trainable']}); trained once and reused at every size.")
    if knn["before"] is not None:
        cost += (f" kNN accuracy of the features on the val split (the {min(runs)} calibration samples as the bank): "
                 f"{knn['before']:.3f} before, {knn['after']:.3f} after.")
    verdict = (f"**Regional pretraining lowered the adapter's test {key} at {', '.join(map(str, worse))} labels**: with "
               f"these settings it does not help on this region." if worse else
               f"Regional pretraining did not lower the adapter's test {key} at any size.")
    return "\n".join([*lines, "", cost, "", verdict])
