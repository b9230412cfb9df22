"""``evaluate``: score a model on any recipe and split, overall and per region."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fmtransfer.config import require
from fmtransfer.data import Preprocess, Recipe, RecipeDataModule, load_recipe
from fmtransfer.data.images import ChannelMismatch, convert_channels
from fmtransfer.errors import ConfigError
from fmtransfer.export.runtime import softmax
from fmtransfer.lineage import RunRecord, write_json_atomic, write_text_atomic
from fmtransfer.lineage.record import RUN_FILE
from fmtransfer.models.classifier import Classifier, load_model, resolve_model_path
from fmtransfer.models.inference import predict
from fmtransfer.plots import confusion_matrix_png
from fmtransfer.tasks.common import run_dir, score_by_region
from fmtransfer.tasks.result import StageResult


def check_fit(recipe: Recipe, meta: dict[str, Any]) -> None:
    """A recipe can feed a model when the tasks agree and the images convert to the model's channels."""
    if recipe.task != meta["task"]:
        raise ConfigError(f"data recipe {recipe.name!r} is a {recipe.task} task but the model is {meta['task']}")
    want = int(meta["preprocess"]["channels"])
    try:
        convert_channels(np.zeros((1, 1, recipe.channels), dtype=np.float32), want)
    except ChannelMismatch:
        raise ConfigError(f"data recipe {recipe.name!r} has data.channels={recipe.channels}, but the model takes "
                          f"{want}-channel images and they cannot be converted") from None


def score_model(model: Classifier, meta: dict[str, Any], recipe: Recipe, *, split: str, out_dir: Path,
                batch_size: int = 256, num_workers: int | str = "auto", accelerator: str = "auto",
                datamodule: RecipeDataModule | None = None, title: str | None = None) -> dict[str, Any]:
    """Predict ``split`` of ``recipe`` with the model's own preprocessing; write metrics, predictions and plots.

    Writes into ``out_dir``: ``predictions_<split>.csv``, ``confusion_<split>.png`` (classification) and returns
    ``{"overall": metrics, "regions": {region: metrics}, "files": {...}}``.
    """
    check_fit(recipe, meta)
    dm = datamodule or RecipeDataModule(recipe, batch_size=batch_size, num_workers=num_workers,
                                        preprocess=Preprocess.from_dict(meta["preprocess"]),
                                        classes=meta["classes"], output_dir=out_dir)
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
    if not cfg.model and not cfg.adapter_file:
        raise ConfigError("pass model=<run dir or model file> and/or adapter=<adapter file>")
    with RunRecord("evaluate", out, cfg) as record:
        if cfg.adapter_file:
            from fmtransfer.tasks.merge import load_adapted

            host, meta, model_path, header = load_adapted(cfg.adapter_file, cfg.model)
            model = host.model
            record_sources(record, model_path, host.base_meta, header, role="model")
        else:
            model_path = resolve_model_path(cfg.model)
            model, meta = load_model(model_path)
            record_sources(record, model_path, meta)
        check_fit(recipe, meta)
        dm = RecipeDataModule(recipe, batch_size=cfg.loader.batch_size, num_workers=cfg.loader.num_workers,
                              preprocess=Preprocess.from_dict(meta["preprocess"]), classes=meta["classes"],
                              output_dir=out)
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


def _model_run_dir(model_path: Path, meta: dict[str, Any]) -> Path | None:
    """The run that produced a model: recorded in its header, else the folder holding it if it is a run dir."""
    recorded = meta.get("lineage", {}).get("run_dir")
    for candidate in ([Path(recorded)] if recorded else []) + [model_path.parent, model_path.parent.parent]:
        if (candidate / RUN_FILE).is_file():
            return candidate
    return None


def record_sources(record: RunRecord, model_path: Path, model_meta: dict[str, Any],
                   header: dict[str, Any] | None = None, role: str | None = None) -> None:
    """Record the model file read (role ``model``, or ``base`` under an adapter) and the adapter file, and the
    runs that produced them as parents."""
    record.add_input(model_path, role or ("base" if header else "model"))
    parents = [_model_run_dir(model_path, model_meta)]
    if header is not None:
        record.add_input(header["path"], "adapter")
        parents.append(Path(header["lineage"]["run_dir"]))
    for parent in parents:
        if parent is not None and (parent / RUN_FILE).is_file():
            record.add_parent(parent)
