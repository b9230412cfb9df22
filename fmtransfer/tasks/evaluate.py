"""``evaluate``: score a model on any recipe and split, overall and per region."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fmtransfer.adapters.loading import allow_unfinished, load_model_or_adapted, require_model_or_adapter
from fmtransfer.config import require, to_plain
from fmtransfer.data import Recipe, RecipeDataModule, build_datamodule, check_fit, load_recipe
from fmtransfer.errors import ConfigError
from fmtransfer.export.runtime import softmax
from fmtransfer.lineage import RunRecord, write_json_atomic, write_text_atomic
from fmtransfer.models.classifier import Classifier, has_head
from fmtransfer.models.inference import embed, predict, with_measured_norms
from fmtransfer.models.probes import knn_scores, linear_probe_scores
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
    return _write_scores(meta["task"], meta["classes"], outputs, targets, rows, table, split, out_dir,
                         title or f"{recipe.name} / {split}")


def score_features(model: Classifier, recipe: Recipe, dm: RecipeDataModule, *, split: str, protocol: str,
                   settings: Any, out_dir: Path, accelerator: str = "auto", seed: int = 0,
                   title: str | None = None) -> dict[str, Any]:
    """Score the frozen features of ``model`` (its head, if any, unused) on ``split`` of a labelled
    classification recipe: ``knn`` (a weighted vote of the nearest train images by cosine similarity) or
    ``linear`` (a logistic regression fitted on the train split's features).

    Args:
        dm: the recipe read with the model's preprocessing and the recipe's own classes.
        settings: ``{"k", "temperature"}`` for knn, ``{"c", "max_iter"}`` for linear (the evaluate config's
            ``knn`` / ``linear`` nodes).
    A model that never trained (random weights, e.g. ``pretrain method=dino trainer.max_epochs=0``) has placeholder
    BatchNorm statistics; they are measured on the train split first (``norm_statistics`` in the result says so).

    Returns:
        as :func:`score_model`, the files named ``predictions_<split>.csv`` and ``confusion_<split>.png``.
    """
    table = dm.prepare()
    classes = table.classes
    scored = with_measured_norms(model, dm.dataloader("train"))
    measured, model = scored is not model, scored
    bank, bank_y = embed(model, dm.dataloader("train"), accelerator), table.targets[dm.rows("train")]
    features, targets, rows = embed(model, dm.dataloader(split), accelerator), table.targets[dm.rows(split)], dm.rows(split)
    if protocol == "knn":
        outputs = knn_scores(bank, bank_y, features, len(classes), int(settings["k"]), float(settings["temperature"]))
    else:
        outputs = linear_probe_scores(bank, bank_y, features, len(classes), float(settings["c"]),
                                      int(settings["max_iter"]), seed)
    result = _write_scores("classification", classes, outputs, targets, rows, table, split, out_dir,
                           f"{title or f'{recipe.name} / {split}'} ({protocol})")
    result["norm_statistics"] = "measured on the train split (the model had none)" if measured else "the model's"
    return result


def _write_scores(task: str, classes: list[str] | None, outputs: np.ndarray, targets: np.ndarray, rows: np.ndarray,
                  table, split: str, out_dir: Path, label: str) -> dict[str, Any]:
    """Metrics overall and per region, ``predictions_<split>.csv`` and (classification) the confusion matrix."""
    result = score_by_region(task, outputs, targets, table.regions[rows], len(classes) if classes else None)
    files = {"predictions": out_dir / f"predictions_{split}.csv"}
    write_text_atomic(files["predictions"], _predictions_csv(task, outputs, targets, rows, table, classes))
    if classes:
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


PROTOCOLS = ("head", "knn", "linear")


def evaluation_protocol(cfg: DictConfig, recipe: Recipe) -> str:
    """The ``protocol`` key, checked against the recipe and split before any model or data is read."""
    require(cfg, "protocol", "knn", "linear", "seed")
    protocol = cfg.protocol
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if protocol != "head" and recipe.task != "classification":
        raise ConfigError(f"protocol={protocol} scores classification recipes; {recipe.name!r} is a {recipe.task} "
                          f"task (score a regression model's head with protocol=head)")
    if protocol != "head" and cfg.split == "train":
        raise ConfigError(f"protocol={protocol} learns from the train split (the kNN bank, the probe's training "
                          f"data); score split=val or split=test")
    return protocol


def evaluate(cfg: DictConfig) -> StageResult:
    """Score ``cfg.model`` on ``cfg.data`` / ``cfg.split``; writes metrics.json, predictions, confusion PNG.

    ``protocol=head`` scores the model's head; ``knn`` and ``linear`` score its frozen features (any model, a
    head-less self-supervised backbone too) with :func:`score_features`.
    """
    require(cfg, "model", "adapter_file", "split", "accelerator", "data", "loader")
    out = run_dir(cfg)
    recipe = load_recipe(cfg.data)
    protocol = evaluation_protocol(cfg, recipe)
    require_model_or_adapter(cfg.model, cfg.adapter_file)
    unfinished = allow_unfinished(cfg)
    with RunRecord("evaluate", out, cfg) as record:
        loaded = load_model_or_adapted(cfg.model, cfg.adapter_file, allow_unfinished=unfinished)
        model, meta, model_path = loaded.model, loaded.meta, loaded.path
        record_sources(record, loaded, role="model")
        if protocol == "head" and not has_head(meta):
            raise ConfigError(f"model {model_path} has no head (a self-supervised backbone): score its features "
                              f"with protocol=knn or protocol=linear, or give it a head with fmtransfer adapt")
        # the head predicts the model's classes; kNN and the linear probe learn the recipe's own
        dm = build_datamodule(recipe, cfg.loader, model_meta=meta, model_classes=protocol == "head", output_dir=out)
        table = dm.prepare()
        record.set_data(recipe.name, recipe.to_dict(), table.fingerprint)
        if protocol == "head":
            result = score_model(model, meta, recipe, split=cfg.split, out_dir=out, datamodule=dm,
                                 accelerator=cfg.accelerator)
        else:
            result = score_features(model, recipe, dm, split=cfg.split, protocol=protocol, settings=cfg[protocol],
                                    out_dir=out, accelerator=cfg.accelerator, seed=int(cfg.seed))
        task, classes = (meta["task"], meta["classes"]) if protocol == "head" else ("classification", table.classes)
        metrics = {"stage": "evaluate", "model": str(model_path), "adapter": cfg.adapter_file,
                   "recipe": recipe.name, "split": cfg.split, "protocol": protocol,
                   **({protocol: to_plain(cfg[protocol])} if protocol != "head" else {}),
                   "task": task, "classes": classes, **result, "data": dm.summary()}
        write_json_atomic(out / "metrics.json", metrics)
        outputs = {"metrics": out / "metrics.json", **result["files"], **dm.files}
        for role, path in outputs.items():
            record.add_output(path, role)
    return StageResult("evaluate", out, metrics, {role: Path(path) for role, path in outputs.items()})
