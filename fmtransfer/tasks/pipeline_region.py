"""A region's steps in the pipeline: which regions (``region=`` or ``regions=[...]``), what each one is against the
global model (read from the data before anything trains), and its steps: zero-shot or a probe in its place,
monitoring, the adapter sweep (with regional pretraining when asked), the plan and the export.

Every region is independent once the global model exists: its steps read the global model and its own data, never
another region's.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fmtransfer.adapters import check_method_fits
from fmtransfer.adapters.harm import DoNoHarmRefused
from fmtransfer.config import build_dataclass, compose_stage, to_plain
from fmtransfer.data import Recipe, build_datamodule, check_fit, load_recipe
from fmtransfer.errors import ConfigError
from fmtransfer.monitoring.drift import NEEDS
from fmtransfer.tasks.adapt import validate_adapt
from fmtransfer.tasks.evaluate import evaluation_protocol
from fmtransfer.tasks.export import GateFailed, export_settings
from fmtransfer.tasks.monitor import MonitorSettings
from fmtransfer.tasks.pipeline_steps import REGION_KEYS, PipelineSettings, Region, RegionFit, Steps

log = logging.getLogger(__name__)

PROBE_NAMES = {"linear": "logistic-regression probe", "knn": "kNN vote"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def regions_of(cfg: DictConfig, settings: PipelineSettings) -> list[Region]:
    """The pipeline's regions, each read against the global data: ``regions=[...]`` when given, else ``region``.

    An entry of ``regions`` is a data recipe's name (as ``region=`` takes it) or a mapping: ``data`` (a recipe's name,
    or a recipe mapping; with ``recipe: <name>`` in it, that recipe with the mapping's other keys on top), ``name``
    (its folder; default: the recipe's name) and any of :data:`REGION_KEYS`, which replace the pipeline's own for this
    region.
    """
    global_recipe = load_recipe(cfg.data)
    global_table = build_datamodule(global_recipe, cfg.loader).prepare()
    entries = to_plain(cfg.get("regions")) or []
    if not entries:
        fit = region_fit(global_recipe, global_table.classes, cfg.region, cfg.loader)
        return [Region("", to_plain(cfg.region), settings, fit)]
    regions = []
    for i, entry in enumerate(entries):
        where = f"regions[{i}]"
        data, name, own = _entry(entry, where)
        try:
            fit = region_fit(global_recipe, global_table.classes, data, cfg.loader)
            merged = OmegaConf.merge(OmegaConf.create(dataclasses.asdict(settings)), own)
            region_settings = build_dataclass(PipelineSettings, merged, where)
        except ConfigError as e:
            raise ConfigError(f"{where} ({name or data.get('name')}): {e}") from None
        regions.append(Region(name or fit.region_recipe, data, region_settings, fit, where))
    seen: dict[str, str] = {}
    for region in regions:
        if region.name in seen:
            raise ConfigError(f"{region.where} and {seen[region.name]} are both named {region.name!r} (a region's "
                              f"steps go in regions/<name>/): give one of them its own name: {{data: ..., name: ...}}")
        seen[region.name] = region.where
    return regions


def _entry(entry: Any, where: str) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """One ``regions`` entry -> (its recipe, its name or None, its own settings)."""
    if isinstance(entry, str):
        entry = {"data": entry}
    if not isinstance(entry, dict) or "data" not in entry:
        raise ConfigError(f"{where}: expected a data recipe's name (regions=[uci_digits_region, ...]) or a mapping "
                          f"with data: <recipe name or mapping> and optionally name: and {', '.join(REGION_KEYS)}; "
                          f"got {entry!r}")
    unknown = sorted(set(entry) - {"data", "name", *REGION_KEYS})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; a region takes data, name and "
                          f"{', '.join(REGION_KEYS)}")
    name = entry.get("name")
    if name is not None and not _NAME.fullmatch(str(name)):
        raise ConfigError(f"{where}.name={name!r}: a region's name is its folder (regions/<name>/): letters, digits, "
                          f"'_', '.' and '-', starting with a letter or digit")
    own = {k: v for k, v in entry.items() if k in REGION_KEYS}
    return _recipe(entry["data"], f"{where}.data"), None if name is None else str(name), own


def _recipe(value: Any, where: str) -> dict[str, Any]:
    """A recipe by name (configs/data and the user's config dirs), or a mapping (over ``recipe: <name>`` if given)."""
    if isinstance(value, dict) and "recipe" not in value:
        return value
    name = value["recipe"] if isinstance(value, dict) else value
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: expected a data recipe's name or a recipe mapping, got {value!r}")
    try:
        recipe = to_plain(compose_stage("pretrain", [f"data={name}"]).data)
    except Exception as e:  # noqa: BLE001 - Hydra's missing-config errors, named for the user
        raise ConfigError(f"{where}={name!r}: no such data recipe ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          f"the packaged ones are in fmtransfer/configs/data/, and your own come from "
                          f"hydra.searchpath or FMTRANSFER_CONFIG_PATH") from None
    if isinstance(value, dict):
        recipe = to_plain(OmegaConf.merge(recipe, {k: v for k, v in value.items() if k != "recipe"}))
    return recipe


def region_fit(global_recipe: Recipe, global_classes: list[str] | None, node: Any, loader: Any) -> RegionFit:
    """Read the region's table (its labels checked against its own class list) and its fit to the global model's
    input (channels): the checks that need the data, before anything trains."""
    region_recipe = load_recipe(node)
    region_dm = build_datamodule(region_recipe, loader)
    region_table = region_dm.prepare()
    _check_channels(region_recipe, global_recipe)
    return RegionFit(global_recipe.name, region_recipe.name, global_recipe.task, region_recipe.task,
                     global_classes, region_table.classes, region_dm.split_size("train"))


def _check_channels(region: Recipe, global_recipe: Recipe) -> None:
    """The global model reads images with the global recipe's channels: the region's must convert to them."""
    try:  # num_outputs 0: the task is the zero-shot decision's (RegionFit), not an error here
        check_fit(region, {"num_outputs": 0, "preprocess": {"channels": global_recipe.channels}})
    except ConfigError as e:
        raise ConfigError(f"region: {e} (the global recipe {global_recipe.name!r}'s channels)") from None


def check_adapters(regions: list[Region], backbone: str) -> None:
    """Every adapter method of every region against the backbone: first, as an unknown one has no config."""
    for region in regions:
        for adapter in dict.fromkeys(a for a, _ in region.settings.adapt_runs()):
            try:
                check_method_fits(adapter, backbone)
            except ConfigError as e:
                where = f"{region.where}.adapter / sweep.adapters" if region.name else "sweep.adapters / adapter"
                raise ConfigError(f"{where}: {e}") from None


def compose_region(steps: Steps, cfg: DictConfig, region: Region) -> None:
    """The region's steps, composed (and not run): zero-shot or the probe, monitoring, the adapt runs, the plan and
    the export."""
    settings, out, data = region.settings, steps.out, {"data": region.data}
    _compose_zero_shot(steps, cfg, region)
    if settings.monitor_region:  # the recipes themselves: a region of one's own need not be a named recipe
        monitor = steps.compose(region.step("monitor"), "monitor",
                                nodes={**nodes_of(cfg, "seed", "accelerator", "loader"),
                                       "reference": to_plain(cfg.data), "current": region.data})
        if not region.fit.zero_shot:
            _monitor_new_classes(steps, region, monitor)

    def adapt_overrides(adapter: str, size: int, checked: bool = False) -> list[str]:
        # the do-no-harm check costs K extra fits: only the region's adapter (the one exported) gets it, also when
        # adapt_overrides sets do_no_harm.folds (that sets the region adapter's check, not the sweep's)
        return [f"adapter={adapter}", f"calibration.size={size}", f"calibration.strategy={settings.calibration.strategy}",
                f"seed={cfg.seed}", *settings.adapt_overrides, *([] if checked else ["do_no_harm.folds=0"])]

    # the adapter the pipeline releases; with export_region_model=false nothing is released, and nothing is checked
    region_run = (settings.adapter, settings.calibration.size) if settings.export_region_model else None
    adapt_nodes = {**data, **nodes_of(cfg, "logger", "deterministic", resolve=False)}
    for adapter, size in settings.adapt_runs():
        steps.compose(region.adapt_step(adapter, size), "adapt",
                      adapt_overrides(adapter, size, (adapter, size) == region_run), nodes=adapt_nodes)
    for i, (adapter, size) in enumerate(settings.regional_runs()):
        # the first run pretrains; the others take its pretraining (the same base, method, data and seed)
        first = out / region.regional_step(*settings.regional_runs()[0])
        regional = f"regional_pretrain.epochs={settings.regional_pretrain.epochs}" if i == 0 else \
            f"regional_pretrain.reuse={first}"
        # compare=false: the run without it is the sweep's own
        steps.compose(region.regional_step(adapter, size), "adapt",
                      [*adapt_overrides(adapter, size), regional, "regional_pretrain.compare=false"], nodes=adapt_nodes)
    steps.compose(region.step("plan"), "plan", nodes={"sweep": str(out / region.step("adapt"))})
    if settings.export_region_model:
        steps.compose(region.step("export"), "export",
                      nodes={**nodes_of(cfg, "seed", "loader", "export", "force"), **data})


def nodes_of(cfg: DictConfig, *keys: str, resolve: bool = True) -> dict[str, Any]:
    """The pipeline's values of ``keys``; unresolved ones keep interpolations such as ``${run_dir}`` for the step."""
    return {k: OmegaConf.to_container(cfg[k], resolve=resolve) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in keys}


def _compose_zero_shot(steps: Steps, cfg: DictConfig, region: Region) -> None:
    """``zero_shot``: the global head on the region; for a region it cannot score, ``probe`` (its frozen embeddings
    with the region adapter's calibration labels, ``new_classes_score``) or nothing, said in ``steps.skipped``."""
    fit, settings = region.fit, region.settings
    nodes = {**nodes_of(cfg, "seed", "split", "accelerator", "loader"), "data": region.data}
    if fit.zero_shot:
        steps.compose(region.step("zero_shot"), "evaluate", nodes=nodes)
        return
    score = settings.new_classes_score
    if score != "none" and fit.region_task == "classification":
        # data.subset: the calibration set, once the region's adapter has run
        steps.compose(region.step("probe"), "evaluate", [f"protocol={score}"], nodes=nodes)
        steps.skipped[region.step("zero-shot")] = (
            f"{fit.why_no_zero_shot()}; in its place a {PROBE_NAMES[score]} on the global model's frozen embeddings, "
            f"fitted on the region adapter's {settings.calibration.size} calibration labels, scored on the region's "
            f"{cfg.split} split")
    else:
        reason = "new_classes_score=none" if score == "none" else f"a probe scores classes, not a {fit.region_task} target"
        steps.skipped[region.step("zero-shot")] = f"{fit.why_no_zero_shot()}; no score in its place ({reason})"


def _monitor_new_classes(steps: Steps, region: Region, monitor: DictConfig) -> None:
    """A region the global head cannot score: its images are still compared with the global data through the global
    model's embeddings (MMD, domain classifier, OOD scores), but tests on the head's class probabilities would only
    say that the region is not made of the global classes: they are left out, said in ``steps.notes``."""
    tests = list(monitor.monitor.tests)
    kept, dropped = [t for t in tests if NEEDS.get(t) != "probs"], [t for t in tests if NEEDS.get(t) == "probs"]
    why = region.fit.why_no_zero_shot()
    if not kept and not monitor.monitor.ood.enabled:
        del steps.configs[region.step("monitor")]
        steps.skipped[region.step("monitoring")] = (f"{why}; monitor.tests={tests} are all tests on the global "
                                                    f"head's class probabilities and the OOD scores are off")
        return
    monitor.monitor.tests = kept
    left_out = f"the tests on the head's class probabilities ({', '.join(dropped)}) are left out, and " if dropped \
        else ""
    steps.notes[region.step("monitoring")] = (
        f"{why}: {left_out}the region's labels are not read (the head has no accuracy on classes it lacks). The "
        f"embedding tests ({', '.join(kept) or 'none'}) and the OOD scores compare the region's images with the global "
        f"data as the global model sees them")


def check_region(steps: Steps, region: Region) -> None:
    """The region's steps' own checks, and its sizes against its data: all that can fail, before anything trains."""
    configs, settings, fit = steps.configs, region.settings, region.fit
    mine = [n for n in configs if n.startswith((region.step("adapt/"), region.step("adapt_regional/")))]
    for name in mine:
        validate_adapt(configs[name])
    too_big = sorted({n for _, n in settings.adapt_runs() if n > fit.region_train})
    if too_big:
        raise ConfigError(f"sweep.sizes / calibration.size {too_big} exceed the train split of region "
                          f"{fit.region_recipe!r} ({fit.region_train} samples)")
    if region.step("probe") in configs:
        probe = configs[region.step("probe")]
        evaluation_protocol(probe, load_recipe(probe.data))
    if region.step("export") in configs:
        export_settings(configs[region.step("export")])
        _check_release(configs[region.released_step], configs[region.step("export")].force)
    if region.step("monitor") in configs:
        MonitorSettings.from_cfg(configs[region.step("monitor")].monitor)


def _check_release(region_adapt: DictConfig, force: bool) -> None:
    """An adapter whose do-no-harm check cannot run is refused by export unless force=true: said before training."""
    if not region_adapt.do_no_harm.folds and force is not True:
        raise ConfigError("adapt_overrides sets do_no_harm.folds=0 for the region's adapter: it would not be checked "
                          "against its base, and export refuses an unchecked adapter after the whole run; drop the "
                          "override, set force=true to export it anyway, or export_region_model=false")


def run_region(steps: Steps, region: Region, base: Path) -> GateFailed | DoNoHarmRefused | None:
    """The region's steps in order over the global model ``base``; a rejected export (or an adapter refused for not
    beating its base) is returned, so that the other regions still run and the report says it."""
    if region.name:
        log.info("pipeline: region %s (%s)", region.name, region.fit.region_recipe)
    if region.step("zero_shot") in steps.configs:
        steps.run(region.step("zero_shot"), {"model": str(base)})
    if region.step("monitor") in steps.configs:
        steps.run(region.step("monitor"), {"model": str(base)})
    for name in [n for n in steps.configs if n.startswith((region.step("adapt/"), region.step("adapt_regional/")))]:
        steps.run(name, {"base": str(base)})
    released = steps.results[region.released_step]
    if region.step("probe") in steps.configs:  # the adapter's labels: its calibration set is the probe's train
        steps.run(region.step("probe"), {"model": str(base), "data.subset": str(released.outputs["calibration"])})
    steps.run(region.step("plan"))
    if region.step("export") in steps.configs:
        try:
            steps.run(region.step("export"), {"adapter_file": str(released.outputs["adapter"])})
        except (GateFailed, DoNoHarmRefused) as e:  # report everything first, then fail
            return e
    return None
