"""``adapt``: a small regional adapter over a global base, from a few hundred local labels."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from fmtransfer.adapters.artifact import ADAPTER_FILE, adapted_meta, save_adapter
from fmtransfer.adapters.calibration import (
    Strategy,
    manifest_ids,
    select_diverse,
    select_random,
    select_stratified,
)
from fmtransfer.adapters.harm import (
    INTERVAL_METHOD,
    compare,
    describe,
    feasible_folds,
    stratified_folds,
    unchecked,
)
from fmtransfer.adapters.head import region_head
from fmtransfer.adapters.loading import allow_unfinished, load_model_or_adapted
from fmtransfer.adapters.methods import AdapterMethod, adapter_state, check_method_fits, trainable_count
from fmtransfer.adapters.settings import AdaptSettings
from fmtransfer.config import build, build_dataclass, require, to_plain
from fmtransfer.data import Preprocess, Recipe, RecipeDataModule, build_datamodule, load_recipe
from fmtransfer.errors import ConfigError
from fmtransfer.lineage import RunRecord, sha256_file, write_json_atomic, write_text_atomic
from fmtransfer.models.backbone import backbone_spec, check_input_size, create_backbone
from fmtransfer.models.classifier import META_FILE, Classifier, model_meta, save_model
from fmtransfer.models.inference import embed, predict
from fmtransfer.models.module import EpochSeed, SupervisedModule
from fmtransfer.models.probes import linear_probe_scores
from fmtransfer.ranks import rank_and_world
from fmtransfer.tasks.common import (
    SetupFingerprint,
    build_augment,
    build_logger,
    build_trainer,
    check_resume_setup,
    checkpoint_callback,
    extra_callbacks,
    metrics_history,
    model_run_dir,
    resolve_resume,
    run_dir,
    setup_fingerprint,
)
from fmtransfer.tasks.evaluate import score_model
from fmtransfer.tasks.regional import (
    Regional,
    RegionalContext,
    check_regional,
    fit_for_crops,
    regional_pretrain,
    regional_settings,
    verdict,
)
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)


def manifest_rows(dm: RecipeDataModule, manifest: str) -> np.ndarray:
    """Table rows of a calibration manifest's ids, in its order; ids outside the train split are refused."""
    table = dm.prepare()
    where = {str(i): r for r, i in enumerate(table.ids)}
    ids = manifest_ids(manifest)
    unknown = [i for i in ids if i not in where]
    if unknown:
        raise ConfigError(f"calibration.manifest={manifest}: {len(unknown)} id(s) are not in the recipe "
                          f"{dm.recipe.name!r}, e.g. {unknown[:3]}")
    rows = np.array([where[i] for i in ids], dtype=np.int64)
    outside = rows[~np.isin(rows, table.indices("train"))]
    if len(outside):
        raise ConfigError(f"calibration.manifest={manifest}: {len(outside)} id(s) lie in the val or test split, e.g. "
                          f"{[str(table.ids[r]) for r in outside[:3]]}; val and test are never used for calibration")
    return rows


def choose_calibration(dm: RecipeDataModule, model, strategy: Strategy, size: int, seed: int,
                       accelerator: str = "auto", manifest: str | None = None) -> np.ndarray:
    """Table rows of the calibration set, drawn from the train split only (never val or test): the first ``size``
    of a manifest's ids, or drawn by ``strategy``."""
    table = dm.prepare()
    pool = table.indices("train")
    if manifest is not None:
        return np.sort(manifest_rows(dm, manifest)[:size])
    if strategy is Strategy.RANDOM:
        pick = select_random(len(pool), size, seed)
    elif strategy is Strategy.STRATIFIED:
        strata = table.targets[pool] if table.classes is not None else np.zeros(len(pool), dtype=np.int64)
        pick = select_stratified(strata, list(table.ids[pool]), size, seed)
    else:
        pick = select_diverse(embed(model, dm.dataloader("train"), accelerator), size, seed)
    return pool[pick]


BASE_DIR = "base"  # base=null: the base made from brought weights, in the run dir
_SETTINGS_KEYS = ("adapter", "calibration", "loss", "scheduler", "resume", "resume_force", "checkpoints",
                  "keep_checkpoints", "accelerator", "do_no_harm")
# the config that makes a checkpoint this run's (with the data recipe, its content fingerprint and the base's
# sha256): resume= refuses a checkpoint written with other values
SETUP_KEYS = ("seed", "adapter", "calibration", "loss", "scheduler", "augment", "loader.batch_size",
              *(f"regional_pretrain.{k}" for k in ("epochs", "trainable", "reuse", "optimizer", "scheduler", "dino")))


@dataclass
class _Inputs:
    """The recipe, the method, the base (loaded for inference) and the region's data read with the base's
    preprocessing."""

    recipe: Recipe
    method: AdapterMethod
    base_path: Path
    model: Classifier
    meta: dict[str, Any]
    dm: RecipeDataModule
    size: int
    resume: Path | None
    setup: dict[str, Any]
    resume_differs: list[str] | None
    brought: Path | None = None  # base=null: the base's files, staged until the run holds its dir


@dataclass
class _Fitted:
    """The adapted model, its metadata and adapter header, and what the training took."""

    meta: dict[str, Any]
    header: dict[str, Any]
    fit_seconds: float
    last_checkpoint: str
    regional: Regional | None = None
    start: Classifier | None = None  # the model before the supervised fit (do_no_harm.folds > 0 only)


def adapt_settings(cfg: DictConfig) -> AdaptSettings:
    """The run's ``adapter``, ``calibration``, loss and checkpoint keys, every key and value checked; their
    defaults live in configs/adapt.yaml and the ``adapter`` group only."""
    require(cfg, *_SETTINGS_KEYS)
    return build_dataclass(AdaptSettings, {k: to_plain(cfg[k]) for k in _SETTINGS_KEYS}, "")


def validate_adapt(cfg: DictConfig) -> tuple[AdaptSettings, Recipe, AdapterMethod]:
    """Checks that need no data or base: the keys, the settings, the recipe, the method, the loss's task."""
    require(cfg, "seed", "base", "data", "loader")
    allow_unfinished(cfg)
    settings = adapt_settings(cfg)
    recipe = load_recipe(cfg.data)
    method: AdapterMethod = build(settings.adapter.method, "adapter.method")
    if recipe.task == "regression" and "CrossEntropy" in str(settings.loss.get("_target_")):
        raise ConfigError(f"data recipe {recipe.name!r} is a regression task: set loss._target_=torch.nn.HuberLoss")
    check_regional(regional_settings(cfg), method, cfg.loader.batch_size)
    return settings, recipe, method


def adapt(cfg: DictConfig) -> StageResult:
    """Choose a calibration set, train the adapter, save ``adapter.safetensors``, score the region's test split.

    Every check that can fail (recipe, method, calibration size, method vs backbone) runs before anything is
    written, so bad input leaves no partial artifact. The result's outputs include ``adapter`` and ``confusion``.
    """
    settings, recipe, method = validate_adapt(cfg)
    rank_and_world()  # a stray RANK=1 would make Lightning train silently and save nothing
    inputs = _load_inputs(cfg, settings, recipe, method)
    out = run_dir(cfg)
    with RunRecord("adapt", out, cfg) as record:  # holds the run dir's lock: every file is written under it
        files = inputs.dm.write_manifests(out / "data")
        files.update(_place_brought_base(inputs, record))
        _record_inputs(record, inputs)
        zero_shot = _zero_shot(inputs, settings, out)
        files["calibration"] = _calibrate(inputs, settings, out)
        if settings.calibration.manifest is not None:
            record.add_input(settings.calibration.manifest, "calibration_manifest")
        base_view = _base_on_calibration(cfg, settings, inputs)
        fitted = _fit(cfg, settings, inputs, record, out)
        fitted.header["do_no_harm"], harm_files = _do_no_harm(cfg, settings, inputs, fitted, base_view, out)
        files.update(harm_files)
        extra = fitted.regional.extra if fitted.regional else ()  # what regional pretraining changed, now frozen
        files["adapter"] = save_adapter(out / ADAPTER_FILE, adapter_state(inputs.model, method, extra), fitted.header)
        files.update(fitted.regional.files if fitted.regional else {})
        if fitted.regional and regional_settings(cfg).compare:
            fitted.regional.without = _without_regional(cfg, settings, inputs, record, out)
        result = _record(cfg, settings, inputs, fitted, zero_shot, files, record, out)
    return result


def _load_inputs(cfg: DictConfig, settings: AdaptSettings, recipe: Recipe, method: AdapterMethod) -> _Inputs:
    """The base and the region's data, with the checks that need them (method vs backbone, the recipe's fit, the
    calibration size against the train split)."""
    brought = None
    if cfg.base is None:
        base_path, model, base_meta, brought = _brought_base(cfg, recipe)
    else:
        base = load_model_or_adapted(cfg.base, allow_unfinished=allow_unfinished(cfg))
        base_path, model, base_meta = base.path, base.model, base.meta
    try:
        check_method_fits(method.name, base_meta["backbone"]["name"])
        dm = build_datamodule(recipe, cfg.loader, model_meta=base_meta, seed=cfg.seed)
        pool = len(dm.prepare().indices("train"))
        manifest = settings.calibration.manifest
        if manifest is not None:  # the manifest's ids are the pool: checked before anything trains
            pool = len(manifest_rows(dm, manifest))
        size = pool if settings.calibration.size is None else settings.calibration.size
        if size > pool:
            where = f"calibration.manifest={manifest} ({pool} ids" if manifest else \
                f"the train split of {recipe.name!r} ({pool} samples"
            raise ConfigError(f"calibration.size={size} is larger than {where}; val and test are never used for "
                              f"calibration)")
        resume = resolve_resume(settings.resume)
        setup = setup_fingerprint(cfg, SETUP_KEYS, recipe, dm.prepare().fingerprint,
                                  **{"base.sha256": base_meta["weights_sha256"]})
        differs = (check_resume_setup(resume, setup, settings.resume_force, f"resume={settings.resume}")
                   if resume is not None else None)
        return _Inputs(recipe, method, base_path, model, base_meta, dm, size, resume, setup, differs, brought)
    except BaseException:
        if brought is not None:  # the staged base of a run that stops here
            shutil.rmtree(brought, ignore_errors=True)
        raise


def _brought_base(cfg: DictConfig, recipe: Recipe) -> tuple[Path, Classifier, dict[str, Any], Path]:
    """``base=null``: the foundation weights the user brings (``backbone.pretrained`` / ``backbone.checkpoint``,
    fitted to the recipe by the backbone factory) as a head-less base, saved sealed in a staging folder.

    Returns:
        the base's final path (``<run dir>/base/model.json``), the model, its header and the staging folder.
    """
    if "backbone" not in cfg:
        raise ConfigError("base=null adapts over foundation weights you bring: pass backbone=<name> with "
                          "backbone.pretrained=true or backbone.checkpoint=<file>, or base=<run dir or model>")
    spec = backbone_spec(cfg.backbone)
    if not spec.pretrained and not spec.checkpoint:
        raise ConfigError(f"base=null with backbone={spec.name} names no weights: an adapter over a random backbone "
                          f"learns little; set backbone.pretrained=true or backbone.checkpoint=<file>")
    if int(spec.in_chans) != recipe.channels:
        raise ConfigError(f"backbone.in_chans={spec.in_chans} does not fit data recipe {recipe.name!r}, whose images "
                          f"have data.channels={recipe.channels}; set backbone.in_chans={recipe.channels}")
    backbone = create_backbone(spec)
    check_input_size(backbone, spec, recipe.image_size, recipe.channels)
    model = Classifier(backbone, 0)
    meta = model_meta(model, spec, task=recipe.task, classes=None, preprocess=Preprocess.from_recipe(recipe),
                      recipe=recipe.name, made_by="adapt base=null")
    staging = Path(tempfile.mkdtemp(prefix="fmtransfer-base-"))
    _, header = save_model(model, meta, staging)
    log.info("base=null: a head-less %s base from %s weights (%s)", spec.name,
             (meta["backbone_weights"] or {}).get("source"), (meta["backbone_weights"] or {}).get("location"))
    return run_dir(cfg) / BASE_DIR / META_FILE, model.eval(), json.loads(header.read_text()), staging


def _place_brought_base(inputs: _Inputs, record: RunRecord) -> dict[str, Path]:
    """``base=null``: move the staged base into ``<run dir>/base/`` (the adapter's header names it there)."""
    if inputs.brought is None:
        return {}
    folder = inputs.base_path.parent
    shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt's, in this run dir
    shutil.move(str(inputs.brought), str(folder))
    location = (inputs.meta["backbone_weights"] or {}).get("location")
    if location and Path(location).is_file():  # a local checkpoint (timm's hub weights are named, not a file here)
        record.add_input(location, "backbone_checkpoint")
    return {"base_weights": folder / inputs.meta["weights"], "base_model": inputs.base_path}


def _record_inputs(record: RunRecord, inputs: _Inputs) -> None:
    record.add_input(inputs.base_path, "base")
    # a base=null base lives in this run's dir: this run is not its own parent
    if inputs.brought is None and (parent := model_run_dir(inputs.base_path, inputs.meta)) is not None:
        record.add_parent(parent)
    recipe = inputs.recipe
    record.set_data(recipe.name, recipe.to_dict(), inputs.dm.prepare().fingerprint)
    if inputs.resume is not None:
        record.add_input(inputs.resume, "resumed_from")
        record.set("resume_differs", inputs.resume_differs)
        if (inputs.resume.parent.parent / "run.json").is_file():  # in this run dir: the attempt before this one
            record.add_parent(inputs.resume.parent.parent)


def _zero_shot(inputs: _Inputs, settings: AdaptSettings, out: Path) -> dict[str, Any] | None:
    """The base on the region's test split before any adaptation, when it knows the region's classes."""
    if inputs.dm.prepare().classes != inputs.meta["classes"]:
        return None
    recipe = inputs.recipe
    scored = score_model(inputs.model, inputs.meta, recipe, split="test", out_dir=out / "zero_shot",
                         datamodule=inputs.dm, accelerator=settings.accelerator, title=f"zero-shot on {recipe.name}")
    return {k: v for k, v in scored.items() if k != "files"}


def _calibrate(inputs: _Inputs, settings: AdaptSettings, out: Path) -> Path:
    """Choose the calibration rows, restrict the train split to them, and save their ids."""
    cal = settings.calibration
    rows = choose_calibration(inputs.dm, inputs.model, cal.strategy, inputs.size, cal.seed, settings.accelerator,
                              manifest=cal.manifest)
    inputs.dm.use_rows("train", rows)
    return write_text_atomic(out / "calibration.csv", _calibration_csv(inputs.dm.prepare(), rows))


def _fit(cfg: DictConfig, settings: AdaptSettings, inputs: _Inputs, record: RunRecord, out: Path) -> _Fitted:
    """Give the base the region's head and the method's structure, and train for ``adapter.steps`` steps."""
    model, base_meta, dm, size = inputs.model, inputs.meta, inputs.dm, inputs.size
    recipe, method = inputs.recipe, inputs.method
    table = dm.prepare()
    backbone_name = base_meta["backbone"]["name"]
    # before the new head and the method's structure draw their initial values: seeded here, they cannot
    # depend on what ran earlier in this process (the pipeline's previous stages)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model.head, head_note = region_head(model.head, base_meta["classes"], table.classes, method.reuse_head)
    regional = regional_settings(cfg)
    if regional.enabled:
        fit_for_crops(model, base_meta, regional)
    method.attach(model, backbone_name)
    pretrained = (regional_pretrain(RegionalContext(cfg, dm, base_meta, inputs.base_path, out, record,
                                                    settings.accelerator, allow_unfinished(cfg), inputs.resume),
                                    regional, model, method) if regional.enabled else None)
    for p in model.head.parameters():
        p.requires_grad = True
    trainable, total = trainable_count(model)
    header = {
        "method": method.describe(), "config": dataclasses.asdict(settings.adapter),
        "base": {"sha256": base_meta["weights_sha256"], "path": str(inputs.base_path.resolve()),
                 "backbone": backbone_name, "run_id": base_meta.get("lineage", {}).get("run_id")},
        "task": recipe.task, "classes": table.classes, "num_outputs": dm.num_outputs,
        "preprocess": base_meta["preprocess"], "head": head_note,
        "calibration": {"size": size, "strategy": settings.calibration.strategy.value,
                        "seed": settings.calibration.seed,
                        **({"manifest": str(settings.calibration.manifest),
                            "manifest_sha256": sha256_file(settings.calibration.manifest)}
                           if settings.calibration.manifest is not None else {})},
        "trainable_parameters": trainable, "total_parameters": total,
        "lineage": {"run_id": record.data["run_id"], "run_dir": str(out.resolve()), "recipe": recipe.name,
                    "data_fingerprint": table.fingerprint},
        **({"regional_pretrain": pretrained.record} if pretrained else {}),
    }
    meta = adapted_meta(base_meta, header)
    # the cross-validation folds of the do-no-harm check start from here: the same head, structure and regional
    # pretraining, before any label is seen
    start = copy.deepcopy(model) if settings.do_no_harm.folds else None
    logger = build_logger(cfg)
    log.info("adapter %s over %s: %d of %d parameters trainable (%.2f%%); %d calibration samples (%s); %s",
             method.name, backbone_name, trainable, total, 100 * trainable / total, size,
             settings.calibration.strategy.value, head_note)
    if logger:
        logger.log_hyperparams({"method": method.name, "calibration_size": size, "trainable_parameters": trainable,
                                "trainable_fraction": trainable / total})
    epochs = _epochs(settings.adapter.steps, size, dm.batch_size)
    ckpt = checkpoint_callback(cfg, out / "checkpoints", every_n_epochs=max(1, epochs // settings.checkpoints))
    callbacks = [ckpt, SetupFingerprint(inputs.setup, record.data["run_id"]), EpochSeed(cfg.seed),
                 *extra_callbacks(cfg)]
    started = time.perf_counter()
    with metrics_history(out, resuming=inputs.resume is not None):
        _train(cfg, settings, model, meta, dm, out, frozen_norm_stats=method.norm_stats == "frozen",
               callbacks=callbacks, logger=logger, resume=inputs.resume)
    return _Fitted(meta, header, time.perf_counter() - started, ckpt.last_model_path, pretrained, start)


def _epochs(steps: int, size: int, batch_size: int) -> int:
    batches = max(1, size // batch_size) if size > batch_size else 1
    return math.ceil(steps / batches)


def _train(cfg: DictConfig, settings: AdaptSettings, model: Classifier, meta: dict[str, Any], dm: RecipeDataModule,
           out: Path, *, frozen_norm_stats: bool, callbacks: list, logger, resume: Path | None = None,
           checkpointing: bool = True) -> None:
    """``adapter.steps`` optimiser steps on ``dm``'s train rows, in place on ``model``."""
    steps = settings.adapter.steps
    module = SupervisedModule(model, dm.recipe.task, build(settings.loss, "loss"),
                              build(settings.adapter.optimizer, "adapter.optimizer"),
                              build(settings.scheduler, "scheduler") if settings.scheduler else None, meta,
                              build_augment(cfg), seed=cfg.seed, frozen_norm_stats=frozen_norm_stats)
    trainer_cfg = OmegaConf.merge(cfg, {"trainer": {"max_epochs": _epochs(steps, len(dm.rows("train")), dm.batch_size),
                                                    "max_steps": steps, "limit_val_batches": 0,
                                                    "num_sanity_val_steps": 0, "log_every_n_steps": min(50, steps)}})
    if not checkpointing:
        with open_dict(trainer_cfg):
            trainer_cfg.trainer.enable_checkpointing = False
    trainer = build_trainer(trainer_cfg, callbacks=callbacks, logger=logger, default_root_dir=out)
    module.train()  # the base was loaded for inference
    trainer.fit(module, train_dataloaders=dm.dataloader("train", shuffle=True),
                ckpt_path=str(resume) if resume else None, weights_only=True)


HARM_DIR = "do_no_harm"
_ZERO_SHOT = "the zero-shot base (its own head)"
_PROBES = {"classification": "a logistic regression on the base's frozen embeddings, fitted on the same training "
                             "folds (the base's head does not predict these classes)",
           "regression": "a ridge regression on the base's frozen embeddings, fitted on the same training folds "
                         "(the base's head does not predict this target)"}


@dataclass
class _BaseView:
    """The base (before adaptation) on the calibration rows: the cross-validation's comparator.

    Attributes:
        rows: the calibration rows (table rows), in order. targets: their labels or values.
        fold: each row's cross-validation fold. folds: how many.
        outputs: the zero-shot base's outputs (when its head predicts the region's classes), else None.
        features: the base's frozen embeddings (a probe fitted on the training folds compares), else None.
    """

    rows: np.ndarray
    targets: np.ndarray
    fold: np.ndarray
    folds: int
    outputs: np.ndarray | None = None
    features: np.ndarray | None = None


def _base_on_calibration(cfg: DictConfig, settings: AdaptSettings, inputs: _Inputs) -> _BaseView | dict[str, Any]:
    """The folds of the do-no-harm check, and the base's outputs (or features) on the calibration rows, taken while
    ``inputs.model`` is still the base. Returns the record of an unchecked adapter when no check can run."""
    requested = settings.do_no_harm.folds
    if not requested:
        log.warning("do_no_harm.folds=0: this adapter is NOT checked against its base; export and pipeline refuse "
                    "it unless force=true")
        return unchecked("do_no_harm.folds=0")
    dm, task = inputs.dm, inputs.recipe.task
    table = dm.prepare()
    rows = np.asarray(dm.rows("train")).copy()
    labels = table.targets[rows].astype(np.int64) if task == "classification" else None
    folds = feasible_folds(labels, len(rows), requested)
    if folds < 2:
        smallest = "" if labels is None else f", {int(np.bincount(labels)[np.unique(labels)].min())} in its " \
                                             f"smallest class"
        reason = (f"the calibration set ({len(rows)} samples{smallest}) is too small for 2 cross-validation folds: "
                  f"each fold must hold every class")
        log.warning("do_no_harm: this adapter is NOT checked against its base: %s; export and pipeline refuse it "
                    "unless force=true", reason)
        return unchecked(reason)
    if folds < requested:
        log.warning("do_no_harm: %d folds instead of do_no_harm.folds=%d: the calibration set's smallest class has "
                    "%d samples, and each fold must hold every class", folds, requested, folds)
    fold = stratified_folds(labels, len(rows), folds, cfg.seed)
    view = _BaseView(rows, table.targets[rows], fold, folds)
    zero_shot = table.classes == inputs.meta["classes"] and int(inputs.meta.get("num_outputs") or 0) > 0 \
        and inputs.meta.get("task") == task
    inputs.model.eval()
    if zero_shot:
        outputs, _, got = predict(inputs.model, dm.dataloader("train"), settings.accelerator)
        view.outputs = _in_order(outputs, got, rows)
    else:
        view.features = embed(inputs.model, dm.dataloader("train"), settings.accelerator)  # in the rows' order
    return view


def _in_order(values: np.ndarray, got: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values`` (one per row of ``got``) in the order of ``rows``."""
    position = {int(r): i for i, r in enumerate(got)}
    return values[[position[int(r)] for r in rows]]


def _sample_scores(task: str, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-sample scores, higher is better: 1/0 correct for classification, minus the squared error otherwise."""
    if task == "classification":
        return (outputs.argmax(1) == targets).astype(np.float64)
    return -((outputs.reshape(len(targets), -1)[:, 0] - targets) ** 2).astype(np.float64)


def _probe_outputs(task: str, train: np.ndarray, train_targets: np.ndarray, queries: np.ndarray, num_outputs: int,
                   seed: int) -> np.ndarray:
    """The cheapest honest stand-in for a base without a head for the region: a linear model on its features."""
    if task == "classification":
        return linear_probe_scores(train, train_targets, queries, num_outputs, seed=seed)
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    return Ridge().fit(scaler.transform(train), train_targets).predict(scaler.transform(queries))[:, None]


def _do_no_harm(cfg: DictConfig, settings: AdaptSettings, inputs: _Inputs, fitted: _Fitted,
                view: _BaseView | dict[str, Any], out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """K-fold cross-validation on the calibration set: the adapter fitted on K-1 folds (the same head, structure,
    regional pretraining, settings, steps and seed as the saved one) against the base on the held-out fold.

    Returns:
        the record for metrics.json and the adapter header, and the files written (``do_no_harm/folds.csv``).
    """
    if isinstance(view, dict):
        return view, {}
    dm, task, harm = inputs.dm, inputs.recipe.task, settings.do_no_harm
    started = time.perf_counter()
    adapter_scores, base_scores = np.empty(len(view.rows)), np.empty(len(view.rows))
    try:
        for k in range(view.folds):
            train, held = view.fold != k, view.fold == k
            outputs = _fold_outputs(cfg, settings, inputs, fitted, view.rows[train], view.rows[held])
            adapter_scores[held] = _sample_scores(task, outputs, view.targets[held])
            base = view.outputs[held] if view.outputs is not None else _probe_outputs(
                task, view.features[train], view.targets[train], view.features[held], dm.num_outputs, cfg.seed)
            base_scores[held] = _sample_scores(task, base, view.targets[held])
    finally:
        dm.use_rows("train", view.rows)  # the calibration set again, for what follows (without_regional)
    result = {"checked": True, "folds": view.folds, "folds_requested": harm.folds,
              "metric": "accuracy" if task == "classification" else "minus squared error",
              "comparator": _ZERO_SHOT if view.outputs is not None else _PROBES[task],
              "confidence": harm.confidence,
              "interval_method": f"{INTERVAL_METHOD}, {harm.resamples} resamples",
              "steps_per_fold": settings.adapter.steps,
              **compare(adapter_scores, base_scores, view.fold, confidence=harm.confidence,
                        resamples=harm.resamples, seed=cfg.seed),
              "seconds": round(time.perf_counter() - started, 2)}
    if result["beats_base"]:
        log.info("do-no-harm: the adapter beats its base on the calibration set: %s", describe(result))
    else:
        log.warning("this adapter does not beat its base on the calibration set: %s. export and pipeline refuse it "
                    "unless force=true", describe(result))
    ids = dm.prepare().ids
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "fold", "target", "adapter_score", "base_score"])
    w.writerows([ids[r], f, f"{t:.6g}", f"{a:.6g}", f"{b:.6g}"]
                for r, f, t, a, b in zip(view.rows, view.fold, view.targets, adapter_scores, base_scores, strict=True))
    return result, {"do_no_harm_folds": write_text_atomic(out / HARM_DIR / "folds.csv", buf.getvalue())}


def _fold_outputs(cfg: DictConfig, settings: AdaptSettings, inputs: _Inputs, fitted: _Fitted, train: np.ndarray,
                  held: np.ndarray) -> np.ndarray:
    """The adapter fitted on ``train`` rows from where the saved one started; its outputs on ``held`` rows."""
    dm = inputs.dm
    model = copy.deepcopy(fitted.start)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm.use_rows("train", train)
    with tempfile.TemporaryDirectory(prefix="fmtransfer-fold-") as scratch:  # Lightning's root: nothing kept
        _train(cfg, settings, model, fitted.meta, dm, Path(scratch), callbacks=[EpochSeed(cfg.seed)], logger=False,
               frozen_norm_stats=inputs.method.norm_stats == "frozen", checkpointing=False)
    model.eval()
    dm.use_rows("train", held)
    outputs, _, got = predict(model, dm.dataloader("train"), settings.accelerator)
    return _in_order(outputs, got, held)


def _record(cfg: DictConfig, settings: AdaptSettings, inputs: _Inputs, fitted: _Fitted,
            zero_shot: dict[str, Any] | None, files: dict[str, Path], record: RunRecord, out: Path) -> StageResult:
    """Score the adapted model on the region's test (and val) split; write ``metrics.json`` and the record."""
    model, dm, header, recipe, method = inputs.model, inputs.dm, fitted.header, inputs.recipe, inputs.method
    model.eval()
    title = f"{method.name} ({inputs.size} labels) on {recipe.name}"
    test = score_model(model, fitted.meta, recipe, split="test", out_dir=out, datamodule=dm,
                       accelerator=settings.accelerator, title=title)
    # the val split (never trained on) is where settings should be compared, leaving test untouched
    val = (score_model(model, fitted.meta, recipe, split="val", out_dir=out, datamodule=dm,
                       accelerator=settings.accelerator, title=f"{title} val")
           if dm.split_size("val") else None)
    adapter_bytes = files["adapter"].stat().st_size
    base_path, base_meta = inputs.base_path, inputs.meta
    base_bytes = (base_path.parent / base_meta["weights"]).stat().st_size if base_meta.get("weights") \
        else base_path.stat().st_size
    trainable, total = header["trainable_parameters"], header["total_parameters"]
    metrics = {
        "stage": "adapt", "method": method.name, "recipe": recipe.name, "base": str(base_path),
        "calibration": header["calibration"], "steps": settings.adapter.steps, "seed": cfg.seed,
        "head": header["head"], "trainable_parameters": trainable, "total_parameters": total,
        "trainable_fraction": trainable / total, "adapter_bytes": adapter_bytes, "base_bytes": base_bytes,
        "adapter_to_base": adapter_bytes / base_bytes, "fit_seconds": round(fitted.fit_seconds, 2),
        "zero_shot": zero_shot, "test": {k: v for k, v in test.items() if k != "files"},
        "val": {k: v for k, v in val.items() if k != "files"} if val else None,
        "regional_pretrain": _regional_metrics(model, fitted.regional, recipe.task, test, val),
        "do_no_harm": header["do_no_harm"],
    }
    write_json_atomic(out / "metrics.json", metrics)
    outputs = {**files, "metrics": out / "metrics.json", **test["files"],
               **{f"val_{k}": v for k, v in (val or {}).get("files", {}).items()}}
    for role, path in outputs.items():
        record.add_output(path, role)
    if settings.keep_checkpoints and fitted.last_checkpoint:
        record.add_output(fitted.last_checkpoint, "last_checkpoint")
    elif (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")  # whole-model resume state, useless once the adapter exists
    return StageResult("adapt", out, metrics, {role: Path(path) for role, path in outputs.items()})


def _without_regional(cfg: DictConfig, settings: AdaptSettings, inputs: _Inputs, record: RunRecord,
                      out: Path) -> dict[str, Any]:
    """The same adapter fitted without regional pretraining (a fresh base, the same calibration set, seed and steps),
    scored on val and test in ``without_regional/``: what regional pretraining is measured against.

    Returns:
        ``{"val": overall metrics or None, "test": overall metrics}``.
    """
    plain = copy.deepcopy(cfg)
    with open_dict(plain):
        plain.regional_pretrain.epochs, plain.regional_pretrain.reuse = 0, None
        plain.logger = None  # logs/metrics.csv stays the saved adapter's
    folder = out / "without_regional"
    base = load_model_or_adapted(inputs.base_path, allow_unfinished=allow_unfinished(cfg))
    other = dataclasses.replace(inputs, model=base.model, method=build(settings.adapter.method, "adapter.method"),
                                resume=None)
    fitted = _fit(plain, settings, other, record, folder)
    other.model.eval()
    title = f"{other.method.name} ({inputs.size} labels) on {inputs.recipe.name}, without regional pretraining"
    scores = {split: score_model(other.model, fitted.meta, inputs.recipe, split=split, out_dir=folder,
                                 datamodule=inputs.dm, accelerator=settings.accelerator, title=f"{title} {split}")
              for split in ("val", "test") if split == "test" or inputs.dm.split_size("val")}
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    record.add_output(scores["test"]["files"]["predictions"], "without_regional_predictions")
    return {split: scores[split]["overall"] if split in scores else None for split in ("val", "test")}


def _regional_metrics(model: Classifier, regional: Regional | None, task: str, test: dict[str, Any],
                      val: dict[str, Any] | None) -> dict[str, Any] | None:
    """What regional pretraining did, the bytes its frozen extras (norms, last block) add to the adapter file and,
    when the adapter was also fitted without it, whether it helped."""
    if regional is None:
        return None
    params = dict(model.named_parameters())
    extra = [params[n] for n in regional.extra]
    metrics = {**regional.record, "extra_parameters": sum(p.numel() for p in extra),
               "extra_bytes": sum(p.numel() * p.element_size() for p in extra)}
    if regional.without is not None:
        with_ = {"val": val["overall"] if val else None, "test": test["overall"]}
        metrics["comparison"] = verdict(task, with_, regional.without)
    return metrics


def _calibration_csv(table, rows: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "label", "region"])
    for r in rows:
        label = table.classes[table.targets[r]] if table.classes is not None else f"{table.targets[r]:.6g}"
        w.writerow([table.ids[r], label, table.regions[r]])
    return buf.getvalue()
