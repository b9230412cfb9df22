"""``pipeline``: the main job. Global pretraining -> evaluation on the global test split -> curation of the global set
(and pretraining on the curated subset) -> for each region, one after another: zero-shot on it (for a region with
classes of its own, a new crop, a probe of the global model's frozen embeddings on the adapter's calibration labels
instead), monitoring against the global data, a sweep of regional adapters, a calibration-size plan and the region's
model exported to ONNX (fp32 + INT8, gated) -> ``report.md`` (and ``report.html``).

The regions: ``region=<recipe>`` (one), or ``regions=[<recipe>, {data: <recipe>, calibration: {size: 50}}, ...]``
(several, each with its own settings on top of the pipeline's, its steps in ``regions/<name>/``).

Each step is a stage run of its own in a sub-folder (with its run.json): its config is composed from the stage's
own entry config (``configs/<stage>.yaml``) plus what the pipeline passes on, every step's config is composed and
checked before anything trains, and the report is assembled from the steps' results.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fmtransfer.adapters.harm import DoNoHarmRefused
from fmtransfer.config import require
from fmtransfer.data import build_datamodule, load_recipe
from fmtransfer.errors import ConfigError, FmtError
from fmtransfer.lineage import RunRecord
from fmtransfer.tasks import pipeline_report
from fmtransfer.tasks.common import run_dir
from fmtransfer.tasks.curate import curation_settings
from fmtransfer.tasks.export import GateFailed
from fmtransfer.tasks.pipeline_region import (
    check_adapters,
    check_region,
    compose_region,
    nodes_of,
    regions_of,
    run_region,
)
from fmtransfer.tasks.pipeline_steps import (
    STAGE_FUNCTIONS,
    TRAINING_KEYS,
    PipelineSettings,
    RegionalSwitch,
    RegionCalibration,
    Steps,
    Sweep,
    pipeline_settings,
)
from fmtransfer.tasks.pretrain import epochs_for_steps, validate
from fmtransfer.tasks.pretrain_dino import is_self_supervised
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)

__all__ = ["STAGE_FUNCTIONS", "PipelineSettings", "RegionCalibration", "RegionalSwitch", "Sweep", "compose_steps",
           "pipeline", "pipeline_settings"]


def pipeline(cfg: DictConfig) -> StageResult:
    """Run the stages in order; see the module docstring. Everything that can fail is checked before pretraining;
    a rejected export is reported (the other regions still run), then fails the run."""
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
        result = pipeline_report.write(steps, record, rejected)
        if len(rejected) == 1 and not steps.regions[0].name:
            raise next(iter(rejected.values()))
        if rejected:
            raise RegionsNotReleased(rejected, len(steps.regions), steps.out / "report.md")
    return result


class RegionsNotReleased(FmtError):
    """Regions of ``regions=[...]`` whose model was not released (an adapter refused, an export rejected); the other
    regions ran and were released, and report.md says which."""

    def __init__(self, rejected: dict[str, GateFailed | DoNoHarmRefused], total: int, report: Path) -> None:
        self.rejected = rejected
        listed = "; ".join(f"{label}: {e}" for label, e in rejected.items())
        super().__init__(f"{len(rejected)} of {total} regions not released ({', '.join(rejected)}), the others were; "
                         f"{report} has every region's figures. {listed}")


def compose_steps(cfg: DictConfig, settings: PipelineSettings, out: Path) -> Steps:
    """Every step's config, composed before anything runs: the global ones, then each region's."""
    require(cfg, "region", "split", "accelerator", "export", "curation", "force", *TRAINING_KEYS)
    regions = regions_of(cfg, settings)
    check_adapters(regions, cfg.backbone.name)
    steps = Steps(out, regions, settings.reuse, settings.rerun)
    steps.compose("pretrain", "pretrain", nodes=nodes_of(cfg, *TRAINING_KEYS, resolve=False))
    if settings.curate_global:
        curate = steps.compose("curate", "curate", nodes=nodes_of(cfg, "seed", "accelerator", "data", "loader",
                                                                  "curation"))
        curate.base = settings.curate_with  # None: the global model, once trained
        if settings.pretrain_curated:
            steps.compose("pretrain_curated", "pretrain", nodes=nodes_of(cfg, *TRAINING_KEYS, resolve=False))
    for region in regions:
        compose_region(steps, cfg, region)
    steps.check_rerun()
    return steps


def _check(steps: Steps, settings: PipelineSettings) -> None:
    """Every step's own checks, and the sizes against the data: all that can fail, before anything trains."""
    configs = steps.configs
    if is_self_supervised(configs["pretrain"]):  # its zero-shot score, report and curated pretraining read a head
        method = "jepa" if "jepa" in configs["pretrain"].method else "dino"
        raise ConfigError(f"pipeline method={method}: the pipeline scores the global model's head, and a "
                          f"self-supervised model has none; run fmtransfer pretrain method={method}, then evaluate "
                          f"model=<run> protocol=knn, curate base=<run> and adapt base=<run> on their own")
    validate(configs["pretrain"])
    for region in steps.regions:
        try:
            check_region(steps, region)
        except ConfigError as e:
            if not region.name:
                raise
            raise ConfigError(f"{region.where} ({region.name}): {e}") from None
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


def _run(steps: Steps, settings: PipelineSettings) -> dict[str, GateFailed | DoNoHarmRefused]:
    """The global steps, then each region's with what the earlier ones produced; the regions' rejected exports (or
    adapters refused for not beating their base), by region."""
    pre = steps.run("pretrain")
    if "curate" in steps.configs:
        curated = steps.run("curate", {} if settings.curate_with else {"base": str(pre.run_dir)})
        if "pretrain_curated" in steps.configs:
            produced: dict[str, Any] = {"data.subset": str(curated.outputs["manifest"])}
            if settings.pretrain_curated_steps == "equal":  # as many optimisation steps as `pre`
                batch_size = steps.configs["pretrain_curated"].loader.batch_size
                produced["trainer.max_epochs"] = epochs_for_steps(pre.metrics["global_step"],
                                                                  curated.metrics["selected"], batch_size)
            steps.run("pretrain_curated", produced)
    rejected = {}
    for region in steps.regions:
        refused = run_region(steps, region, pre.run_dir)
        if refused is not None:
            rejected[region.label] = refused
    return rejected

