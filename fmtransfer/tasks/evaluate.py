"""``evaluate``: score a model on any recipe and split, overall and per region."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fmtransfer.adapters.loading import load_model_or_adapted, require_model_or_adapter
from fmtransfer.config import require
from fmtransfer.data import Recipe, RecipeDataModule, build_datamodule, check_fit, load_recipe
from fmtransfer.export.runtime import softmax
from fmtransfer.lineage import RunRecord, write_json_atomic, write_text_atomic
from fmtransfer.models.classifier import Classifier
from fmtransfer.models.inference import predict
from fmtransfer.plots import confusion_matrix_png
from fmtransfer.tasks.common import record_sources, run_dir, score_by_region
from fmtransfer.tasks.result import StageResult


def score_model(model: Classifier, meta: dict[str, Any], recipe: Recipe, *, split: str, out_dir: Path,
                batch_size: int = 256, num_workers: int | str = "auto", accelerator: str = "auto",
                datamodule: RecipeDataModule | None = None, title: str | None = None) -> dict[str, Any]:
    """Predict ``split`` of ``recipe`` with the model's own preprocessing; write metrics, predictions and plots.

    Writes into ``out_dir``: ``predictions_<split>.csv``, ``confusion_<split>.png`` (classification) and returns
    ``{"overall": metrics, "regions": {region: metrics}, "files": {...}}``.
    """
    check_fit(recipe, meta)
    dm = datamodule or build_datamodule(recipe, {"batch_size": batch_size, "num_workers": num_workers},
                                        model_meta=meta, model_classes=True, output_dir=out_dir)
    table = dm.prepare()
    outputs, targets, rows = predict(model, dm.dataloader(split), accelerator=accelerator)
    classes = meta["classes"]
    result = score_by_region(meta["task"], outputs, targets, table.regions[rows],
                             len(classes) if classes else None)
    files = {"predictions": out_dir / f"predictions_{split}.csv"}
    write_text_atomic(files["predictions"], _predictions_csv(meta["task"], outputs, targets, rows, table, classes))
    if classes:
        label = title or f"{recipe.name} / {split}"
        files["confusion"] = confusion_matrix_png(np.array(result["overall"]["confusion_matrix"]), classes,
                                                  out_dir / f"confusion_{split}.png",
                                                  f"{label}: accuracy {result['overall']['accuracy']:.3f}")
    result["files"] = {k: str(v) for k, v in files.items()}
    return result


def _predictions_csv(task: str, outputs: np.ndarray, targets: np.ndarray, rows: np.ndarray, table,
                     classes: list[str] | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    if task == "classification":
        probs = softmax(outputs)
        w.writerow(["id", "region", "label", "prediction", "confidence"])
        for i, row in enumerate(rows):
            p = int(probs[i].argmax())
            w.writerow([table.ids[row], table.regions[row], classes[int(targets[i])], classes[p], f"{probs[i, p]:.4f}"])
    else:
        w.writerow(["id", "region", "target", "prediction"])
        for i, row in enumerate(rows):
            w.writerow([table.ids[row], table.regions[row], f"{targets[i]:.6g}", f"{outputs[i, 0]:.6g}"])
    return buf.getvalue()


def evaluate(cfg: DictConfig) -> StageResult:
    """Score ``cfg.model`` on ``cfg.data`` / ``cfg.split``; writes metrics.json, predictions, confusion PNG."""
    require(cfg, "model", "adapter_file", "split", "accelerator", "data", "loader")
    out = run_dir(cfg)
    recipe = load_recipe(cfg.data)
    require_model_or_adapter(cfg.model, cfg.adapter_file)
    with RunRecord("evaluate", out, cfg) as record:
        loaded = load_model_or_adapted(cfg.model, cfg.adapter_file)
        model, meta, model_path = loaded.model, loaded.meta, loaded.path
        record_sources(record, loaded, role="model")
        dm = build_datamodule(recipe, cfg.loader, model_meta=meta, model_classes=True, output_dir=out)
        table = dm.prepare()
        record.set_data(recipe.name, recipe.to_dict(), table.fingerprint)
        result = score_model(model, meta, recipe, split=cfg.split, out_dir=out, datamodule=dm,
                             accelerator=cfg.accelerator)
        metrics = {"stage": "evaluate", "model": str(model_path), "adapter": cfg.adapter_file,
                   "recipe": recipe.name, "split": cfg.split,
                   "task": meta["task"], "classes": meta["classes"], **result, "data": dm.summary()}
        write_json_atomic(out / "metrics.json", metrics)
        outputs = {"metrics": out / "metrics.json", **result["files"], **dm.files}
        for role, path in outputs.items():
            record.add_output(path, role)
    return StageResult("evaluate", out, metrics, {role: Path(path) for role, path in outputs.items()})
