"""``pretrain``: supervised training of a global backbone + head on a data recipe."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from fmtransfer.config import build, require
from fmtransfer.data import Preprocess, build_datamodule, load_recipe
from fmtransfer.errors import ConfigError
from fmtransfer.lineage import RunRecord, write_json_atomic
from fmtransfer.models.backbone import backbone_spec, check_input_size, create_backbone
from fmtransfer.models.classifier import Classifier, model_meta, save_model
from fmtransfer.models.module import EpochSeed, SupervisedModule
from fmtransfer.plots import training_curves_png
from fmtransfer.ranks import rank_and_world
from fmtransfer.tasks.common import (
    SetupFingerprint,
    TrainThroughput,
    build_augment,
    build_logger,
    build_trainer,
    checkpoint_callback,
    extra_callbacks,
    metrics_history,
    record_training_inputs,
    resolve_resume,
    run_dir,
    setup_fingerprint,
)
from fmtransfer.tasks.evaluate import score_model
from fmtransfer.tasks.pretrain_dino import is_self_supervised, pretrain_dino
from fmtransfer.tasks.pretrain_jepa import is_jepa, pretrain_jepa
from fmtransfer.tasks.result import StageResult

# the config that makes a checkpoint this run's (with the data recipe and its content fingerprint): resume=
# refuses a checkpoint written with other values
SETUP_KEYS = ("seed", "backbone", "method", "augment", "loader.batch_size")


def epochs_for_steps(steps: int, n_train: int, batch_size: int) -> int:
    """Epochs over ``n_train`` images that take about ``steps`` optimisation steps (the loader drops the last
    partial batch), e.g. to train on a subset for as many steps as on the full data."""
    return max(1, round(int(steps) / max(1, int(n_train) // int(batch_size))))


def validate(cfg: DictConfig):
    """Every check that needs no data: the keys, recipe, backbone, method and their fit. Returns (recipe, spec)."""
    require(cfg, "seed", "data", "backbone", "method.task", "method.loss", "method.optimizer", "method.scheduler",
            "trainer", "loader", "resume", "resume_force")
    recipe = load_recipe(cfg.data)
    spec = backbone_spec(cfg.backbone)
    if int(spec.in_chans) != recipe.channels:
        raise ConfigError(f"backbone.in_chans={spec.in_chans} does not fit data recipe {recipe.name!r}, whose images "
                          f"have data.channels={recipe.channels}; set backbone.in_chans={recipe.channels} (or "
                          f"data.channels={spec.in_chans} to convert the images)")
    task = cfg.method.task
    if task != recipe.task:
        fix = "method=regression" if recipe.task == "regression" else "method=supervised"
        raise ConfigError(f"method is for {task} but data recipe {recipe.name!r} is a {recipe.task} task; use {fix}")
    return recipe, spec


def pretrain(cfg: DictConfig) -> StageResult:
    """Train, checkpoint every epoch, save ``model.safetensors`` + ``model.json``, score the test split.

    The result's outputs include ``model`` (model.json), ``confusion`` and ``training_curves``. Raises FmtError on
    bad config or data before training. ``method=dino`` trains without labels (:func:`pretrain_dino`), and
    ``method=jepa`` on top of a frozen DINO teacher (:func:`pretrain_jepa`).
    """
    if is_self_supervised(cfg):
        return pretrain_jepa(cfg) if is_jepa(cfg) else pretrain_dino(cfg)
    out = run_dir(cfg)
    recipe, spec = validate(cfg)
    rank_and_world()  # a stray RANK=1 would make Lightning train silently and write no metrics or model
    resume = resolve_resume(cfg.resume)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # before the data scan: weights that cannot be fetched (no hub) or fitted fail in seconds, not after reading
    # 90,000 images; the data scan draws nothing from the seeded generators, so the initial weights are the same
    backbone = create_backbone(spec)
    check_input_size(backbone, spec, recipe.image_size, recipe.channels)
    dm = build_datamodule(recipe, cfg.loader, seed=cfg.seed, output_dir=out)
    with RunRecord("pretrain", out, cfg) as record:
        table = dm.prepare()
        record.set_data(recipe.name, recipe.to_dict(), table.fingerprint)
        setup = setup_fingerprint(cfg, SETUP_KEYS, recipe, table.fingerprint)
        record_training_inputs(record, cfg, resume, setup, spec.checkpoint)

        preprocess = Preprocess.from_recipe(recipe)
        model = Classifier(backbone, dm.num_outputs)
        meta = model_meta(model, spec, task=recipe.task, classes=table.classes, preprocess=preprocess,
                          run_id=record.data["run_id"], run_dir=str(out.resolve()), recipe=recipe.name,
                          data_fingerprint=table.fingerprint)
        scheduler = build(cfg.method.scheduler, "method.scheduler") if cfg.method.scheduler else None
        augment = build_augment(cfg)
        module = SupervisedModule(model, recipe.task, build(cfg.method.loss, "method.loss"),
                                  build(cfg.method.optimizer, "method.optimizer"), scheduler, meta, augment,
                                  seed=cfg.seed)
        throughput = TrainThroughput()
        ckpt = checkpoint_callback(cfg, out / "checkpoints")
        callbacks = [ckpt, SetupFingerprint(setup, record.data["run_id"]), EpochSeed(cfg.seed), throughput,
                     *extra_callbacks(cfg)]
        trainer = build_trainer(cfg, callbacks=callbacks, logger=build_logger(cfg), default_root_dir=out)
        record.set("trainable_parameters", sum(p.numel() for p in model.parameters() if p.requires_grad))
        started = time.perf_counter()
        with metrics_history(out, resuming=resume is not None):
            trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
        fit_seconds = time.perf_counter() - started
        if not trainer.is_global_zero:  # the model, scores and metrics are rank 0's to write
            return StageResult("pretrain", out, {"stage": "pretrain", "rank": trainer.global_rank}, {})

        files = dict(zip(("weights", "model"), save_model(model, meta, out)))
        test = score_model(model, meta, recipe, split="test", out_dir=out, datamodule=dm,
                           title=f"{spec.name} on {recipe.name} test")
        curves = training_curves_png(out / "logs" / "metrics.csv", out / "training_curves.png",
                                     f"{spec.name} on {recipe.name}")
        per_epoch = throughput.per_epoch
        metrics = {
            "stage": "pretrain", "task": recipe.task, "backbone": spec.name, "recipe": recipe.name,
            "backbone_weights": meta["backbone_weights"],  # where the initial weights came from, what was adapted
            "epochs": trainer.current_epoch, "global_step": trainer.global_step, "fit_seconds": round(fit_seconds, 2),
            "train_images_per_s": {"median": statistics.median(per_epoch) if per_epoch else None,
                                   "per_epoch": [round(v, 1) for v in per_epoch]},
            "last_epoch": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "test": {k: v for k, v in test.items() if k != "files"},
            "data": dm.summary(),
        }
        write_json_atomic(out / "metrics.json", metrics)
        outputs = {**files, "metrics": out / "metrics.json", **test["files"], **dm.files}
        if curves:
            outputs["training_curves"] = curves
        if ckpt.last_model_path:
            outputs["last_checkpoint"] = ckpt.last_model_path
        for role, path in outputs.items():
            record.add_output(path, role)
    return StageResult("pretrain", out, metrics, {role: Path(path) for role, path in outputs.items()})
