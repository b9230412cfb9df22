"""``pipeline``: the main job. Global pretraining -> evaluation on the global test split and zero-shot on a
region -> curation of the global set (and pretraining on the curated subset) -> a sweep of regional adapters -> a calibration-size plan -> the region's model exported to ONNX (fp32
+ INT8, gated) -> ``report.md``.
Each step is a stage run of its own (a sub-folder with its run.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fmtransfer.adapters.methods import METHODS
from fmtransfer.config import compose_stage
from fmtransfer.data import RecipeDataModule, load_recipe
from fmtransfer.errors import ConfigError
from fmtransfer.lineage import RunRecord, write_text_atomic
from fmtransfer.models.families import family_of
from fmtransfer.tasks.adapt import adapt, validate_adapt
from fmtransfer.tasks.common import run_dir
from fmtransfer.tasks.curate import curate, curation_settings
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.export import GateFailed, export, validate_export
from fmtransfer.tasks.plan import plan
from fmtransfer.tasks.pretrain import epochs_for_steps, pretrain, validate
from fmtransfer.tasks.report import metric_rows, results_table, write_report


def _sub_config(cfg: DictConfig, folder: Path, **values: Any) -> DictConfig:
    """A copy of ``cfg`` (interpolations kept, so ``${run_dir}`` follows) writing into ``folder``."""
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    sub.run_dir = str(folder)
    for key, value in values.items():
        OmegaConf.update(sub, key, value, force_add=True)
    return sub


def _adapt_configs(cfg: DictConfig, folder: Path) -> list[tuple[str, int, DictConfig]]:
    """One composed and validated ``adapt`` config per (adapter, size) of the sweep, plus the region's own if
    not in it. ``base`` is filled in once the global model exists."""
    grid = [(a, int(n)) for a in cfg.sweep.adapters for n in cfg.sweep.sizes]
    if (cfg.adapter, int(cfg.calibration.size)) not in grid:
        grid.append((cfg.adapter, int(cfg.calibration.size)))
    configs = []
    for i, (adapter, size) in enumerate(grid):
        if adapter not in METHODS:
            raise ConfigError(f"sweep.adapters: {adapter!r} is not an adapter; choose from {', '.join(METHODS)}")
        if adapter == "vpt" and not family_of(cfg.backbone.name).prompts:
            raise ConfigError(f"sweep.adapters: vpt needs a Vision Transformer, but backbone {cfg.backbone.name!r} "
                              f"is of the {family_of(cfg.backbone.name).name!r} family")
        sub = compose_stage("adapt", [f"adapter={adapter}", f"calibration.size={size}",
                                      f"calibration.strategy={cfg.calibration.strategy}", f"seed={cfg.seed}",
                                      *cfg.adapt_overrides, f"run_dir={folder / f'{i}_{adapter}_n{size}'}"])
        sub.data = OmegaConf.to_container(cfg.region, resolve=True)
        sub.logger = OmegaConf.to_container(cfg.logger, resolve=False)
        validate_adapt(sub)
        configs.append((adapter, size, sub))
    return configs


def pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run the stages in order; returns ``{"run_dir", "report", "steps": {...}}``."""
    out = run_dir(cfg)
    validate(cfg)  # fail on config errors before anything runs
    region = load_recipe(cfg.region)
    if cfg.adapter not in METHODS:
        raise ConfigError(f"adapter={cfg.adapter!r} is not an adapter; choose from {', '.join(METHODS)}")
    pool = RecipeDataModule(region).split_size("train")
    too_big = sorted({int(n) for n in [*cfg.sweep.sizes, cfg.calibration.size] if int(n) > pool})
    if too_big:
        raise ConfigError(f"sweep.sizes / calibration.size {too_big} exceed the train split of region "
                          f"{region.name!r} ({pool} samples)")
    if cfg.get("pretrain_curated_steps", "equal") not in ("equal", "epochs"):
        raise ConfigError(f"pretrain_curated_steps={cfg.pretrain_curated_steps!r}: choose equal (as many "
                          f"optimisation steps as the full pretraining) or epochs (as many epochs)")
    adapt_configs = _adapt_configs(cfg, out / "adapt")
    if cfg.export_region_model:
        validate_export(cfg.export)
    if cfg.curate_global:
        settings = curation_settings(cfg)
        global_pool = RecipeDataModule(load_recipe(cfg.data)).split_size(cfg.curation.split)
        settings.target(global_pool)
        if settings.levels[0] > global_pool:
            raise ConfigError(f"curation.levels={settings.levels}: k={settings.levels[0]} is larger than the "
                              f"{global_pool} samples of the global {cfg.curation.split} split")
    with RunRecord("pipeline", out, cfg) as record:
        pre = pretrain(_sub_config(cfg, out / "pretrain", stage="pretrain"))
        record.add_parent(pre["run_dir"])
        region_cfg = OmegaConf.create({
            "stage": "evaluate", "seed": cfg.seed, "run_dir": str(out / "zero_shot"), "model": pre["run_dir"],
            "split": cfg.split, "accelerator": cfg.accelerator,
            "data": OmegaConf.to_container(cfg.region, resolve=True),
            "loader": OmegaConf.to_container(cfg.loader, resolve=True)})
        zero = evaluate(region_cfg)
        record.add_parent(zero["run_dir"])
        curated = curated_pre = None
        if cfg.curate_global:
            curated = curate(OmegaConf.create({
                "stage": "curate", "seed": cfg.seed, "run_dir": str(out / "curate"), "base": pre["run_dir"],
                "resume": None, "accelerator": cfg.accelerator, "data": OmegaConf.to_container(cfg.data, resolve=True),
                "loader": OmegaConf.to_container(cfg.loader, resolve=True),
                "curation": OmegaConf.to_container(cfg.curation, resolve=True)}))
            record.add_parent(curated["run_dir"])
            if cfg.pretrain_curated:
                extra = {"data.subset": curated["manifest"]}
                if cfg.get("pretrain_curated_steps", "equal") == "equal":  # as many optimisation steps as `pre`
                    extra["trainer.max_epochs"] = epochs_for_steps(pre["metrics"]["global_step"],
                                                                   curated["metrics"]["selected"], cfg.loader.batch_size)
                curated_pre = pretrain(_sub_config(cfg, out / "pretrain_curated", stage="pretrain", **extra))
                record.add_parent(curated_pre["run_dir"])

        adapted = {}
        for adapter, size, sub in adapt_configs:
            sub.base = pre["run_dir"]
            adapted[(adapter, size)] = adapt(sub)
            record.add_parent(adapted[(adapter, size)]["run_dir"])
        planned = plan(OmegaConf.create({"stage": "plan", "run_dir": str(out / "plan"), "sweep": str(out / "adapt"),
                                         "targets": [0.9, 0.95, 0.99], "metric": "accuracy"}))
        record.add_parent(planned["run_dir"])
        region_run = adapted[(cfg.adapter, int(cfg.calibration.size))]
        exported = rejected = None
        if cfg.export_region_model:
            try:
                exported = export(OmegaConf.create({
                    "stage": "export", "seed": cfg.seed, "run_dir": str(out / "export"), "model": None,
                    "adapter_file": region_run["adapter"], "data": OmegaConf.to_container(cfg.region, resolve=True),
                    "loader": OmegaConf.to_container(cfg.loader, resolve=True),
                    "export": OmegaConf.to_container(cfg.export, resolve=True)}))
                record.add_parent(exported["run_dir"])
            except GateFailed as e:  # report everything first, then fail
                rejected = e

        pm, zm = pre["metrics"], zero["metrics"]
        task = pm["task"]
        am = region_run["metrics"]
        rows = (metric_rows(f"global {pm['backbone']}", pm["recipe"], "test", pm["test"])
                + (metric_rows(f"global {pm['backbone']}, curated {curated['metrics']['fraction']:.0%} of the train "
                               f"split ({curated_pre['metrics']['global_step']} steps vs {pm['global_step']})",
                               pm["recipe"], "test", curated_pre["metrics"]["test"]) if curated_pre else [])
                + metric_rows(f"global {pm['backbone']}, zero-shot", zm["recipe"], zm["split"], zm)
                + metric_rows(f"+ {am['method']} adapter, {am['calibration']['size']} labels", am["recipe"], "test",
                              am["test"]))
        data = pm["data"]
        setup = (f"Backbone `{pm['backbone']}` trained on `{pm['recipe']}` ({data['splits']['train']} train / "
                 f"{data['splits']['val']} val / {data['splits']['test']} test images) for {pm['epochs']} epochs in "
                 f"{pm['fit_seconds']:.0f} s ({pm['train_images_per_s']['median'] or 0:.0f} images/s), then scored "
                 f"without any adaptation on `{zm['recipe']}` ({zm['overall']['n']} {zm['split']} images). "
                 f"The region's adapter (`{am['method']}`, {am['calibration']['size']} {am['calibration']['strategy']} "
                 f"labels from the region's train split) trains {am['trainable_fraction']:.2%} of the parameters "
                 f"and is one {am['adapter_bytes'] / 1e6:.2f} MB file ({am['adapter_to_base']:.1%} of the base).")
        sections = [("Setup", setup), ("Results", results_table(rows, task)),
                    ("Calibration-size plan", planned["markdown"])]
        if curated is not None:
            sections.insert(2, ("Data curation", Path(curated["report"]).read_text().split("\n", 2)[2]
                                .split("![")[0].strip()))
        if exported is not None or rejected is not None:
            text = (out / "export" / "export.md").read_text().split("\n", 2)[2].strip()
            sections.append(("Edge export", text if rejected is None else f"**Rejected**: {rejected}\n\n{text}"))
        images = [("Global test split", Path(pre["run_dir"]) / "confusion_test.png"),
                  (f"Zero-shot on {zm['recipe']}", Path(zero["run_dir"]) / f"confusion_{zm['split']}.png"),
                  ("Training curves", Path(pre["run_dir"]) / "training_curves.png"),
                  (f"{am['method']} adapter on {am['recipe']}", Path(region_run["run_dir"]) / "confusion_test.png"),
                  ("Accuracy against local labels", Path(planned["run_dir"]) / "learning_curve.png")]
        if curated is not None:
            images += [("Curation: cluster sizes", Path(curated["run_dir"]) / "cluster_sizes.png"),
                       ("Curation: PCA map", Path(curated["run_dir"]) / "pca.png")]
        report_path = out / "report.md"
        text = write_report(report_path, title="fmtransfer pipeline report", run=record.data,
                            sections=[*sections, ("Stages", "\n".join(
                                          [f"- pretrain: `{pre['run_dir']}`", f"- zero-shot: `{zero['run_dir']}`",
                                           *([f"- curation: `{curated['manifest']}`"] if curated else []),
                                           f"- region adapter: `{region_run['adapter']}`",
                                           f"- adaptation sweep: `{out / 'adapt'}`", f"- plan: `{planned['run_dir']}`",
                                           *([f"- edge export: `{exported['model']}`"] if exported else []),
                                           *([f"- edge export: rejected, `{out / 'export' / 'rejected'}`"]
                                             if rejected else [])]))],
                            images=[(c, p) for c, p in images if p.is_file()])
        write_text_atomic(report_path, text)
        record.add_output(report_path, "report")
        if rejected is not None:
            raise rejected
    return {"run_dir": str(out), "report": str(report_path),
            "steps": {"pretrain": pre, "zero_shot": zero, "adapt": region_run, "sweep": list(adapted.values()),
                      "plan": planned, "export": exported, "curate": curated, "pretrain_curated": curated_pre}}
