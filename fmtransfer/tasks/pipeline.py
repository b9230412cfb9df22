"""``pipeline``: the main job, global pretraining -> evaluation on the global test split and zero-shot on a
region -> ``report.md``. Each step is a stage run of its own (sub-folder with its run.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fmtransfer.data import load_recipe
from fmtransfer.lineage import RunRecord, write_text_atomic
from fmtransfer.tasks.common import run_dir
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.pretrain import pretrain, validate
from fmtransfer.tasks.report import metric_rows, results_table, write_report


def _sub_config(cfg: DictConfig, folder: Path, **values: Any) -> DictConfig:
    """A copy of ``cfg`` (interpolations kept, so ``${run_dir}`` follows) writing into ``folder``."""
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    sub.run_dir = str(folder)
    for key, value in values.items():
        OmegaConf.update(sub, key, value, force_add=True)
    return sub


def pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run the stages in order; returns ``{"run_dir", "report", "steps": {...}}``."""
    out = run_dir(cfg)
    validate(cfg)  # fail on config errors before anything runs
    load_recipe(cfg.region)
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

        pm, zm = pre["metrics"], zero["metrics"]
        task = pm["task"]
        rows = (metric_rows(f"global {pm['backbone']}", pm["recipe"], "test", pm["test"])
                + metric_rows(f"global {pm['backbone']}, zero-shot", zm["recipe"], zm["split"], zm))
        data = pm["data"]
        setup = (f"Backbone `{pm['backbone']}` trained on `{pm['recipe']}` ({data['splits']['train']} train / "
                 f"{data['splits']['val']} val / {data['splits']['test']} test images) for {pm['epochs']} epochs in "
                 f"{pm['fit_seconds']:.0f} s ({pm['train_images_per_s']['median'] or 0:.0f} images/s), then scored "
                 f"without any adaptation on `{zm['recipe']}` ({zm['overall']['n']} {zm['split']} images).")
        images = [("Global test split", Path(pre["run_dir"]) / "confusion_test.png"),
                  (f"Zero-shot on {zm['recipe']}", Path(zero["run_dir"]) / f"confusion_{zm['split']}.png"),
                  ("Training curves", Path(pre["run_dir"]) / "training_curves.png")]
        report_path = out / "report.md"
        text = write_report(report_path, title="fmtransfer pipeline report", run=record.data,
                            sections=[("Setup", setup), ("Results", results_table(rows, task)),
                                      ("Stages", f"- pretrain: `{pre['run_dir']}`\n- zero-shot: `{zero['run_dir']}`")],
                            images=[(c, p) for c, p in images if p.is_file()])
        write_text_atomic(report_path, text)
        record.add_output(report_path, "report")
    return {"run_dir": str(out), "report": str(report_path), "steps": {"pretrain": pre, "zero_shot": zero}}
