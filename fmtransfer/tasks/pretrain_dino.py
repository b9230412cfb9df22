"""``pretrain method=dino``: self-supervised pretraining of a backbone on any recipe, labels unused.

    fmtransfer pretrain method=dino data=mnist_global backbone=resnet18 trainer.max_epochs=20

Writes the teacher's backbone without a head (``model.safetensors`` + ``model.json``, ``num_outputs`` 0),
``checkpoints/``, ``metrics.json`` with the collapse signals of every epoch (and the kNN accuracy on the val split
when the recipe has labels), ``collapse_signals.png`` and, with labels, the kNN score of the test split.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from fmtransfer.config import build, build_dataclass, require
from fmtransfer.data import Preprocess, RecipeDataModule, build_datamodule, load_recipe
from fmtransfer.data.recipe import Recipe
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.lineage import RunRecord, write_json_atomic
from fmtransfer.models.backbone import BackboneSpec, backbone_spec, check_input_size, create_backbone
from fmtransfer.models.classifier import Classifier, model_meta, save_model
from fmtransfer.models.dino import (
    CollapseError,
    CropPlan,
    DinoModule,
    DinoSettings,
    KnnMonitor,
    KnnSettings,
    plan_crops,
)
from fmtransfer.models.families import family_of
from fmtransfer.models.module import EpochSeed
from fmtransfer.plots import collapse_signals_png, training_curves_png
from fmtransfer.ranks import rank_and_world
from fmtransfer.tasks.common import (
    SetupFingerprint,
    TrainThroughput,
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
from fmtransfer.tasks.evaluate import score_features
from fmtransfer.tasks.result import StageResult

SELF_SUPERVISED = "self_supervised"
# the config that makes a checkpoint this run's (with the data recipe and its content fingerprint): resume= refuses
# a checkpoint written with other values. `method` holds every DINO setting (crops, temperatures, momenta, head)
# besides the optimiser and schedule; DINO reads no `augment`
DINO_SETUP_KEYS = ("seed", "backbone", "method", "loader.batch_size")
log = logging.getLogger(__name__)


def is_self_supervised(cfg: DictConfig) -> bool:
    """Whether the ``method`` group asks for self-supervised pretraining (``method=dino``)."""
    return cfg.method.get("task") == SELF_SUPERVISED


def dino_settings(cfg: DictConfig) -> DinoSettings:
    require(cfg, "method.dino")
    return build_dataclass(DinoSettings, cfg.method.dino, "method.dino")


def validate_ssl(cfg: DictConfig) -> tuple[Recipe, BackboneSpec]:
    """The checks every self-supervised stage makes before anything else: keys, recipe, backbone and their fit."""
    require(cfg, "seed", "data", "backbone", "method.optimizer", "method.scheduler", "trainer", "loader", "resume",
            "resume_force")
    recipe = load_recipe(cfg.data)
    spec = backbone_spec(cfg.backbone)
    if int(spec.in_chans) != recipe.channels:
        raise ConfigError(f"backbone.in_chans={spec.in_chans} does not fit data recipe {recipe.name!r}, whose images "
                          f"have data.channels={recipe.channels}; set backbone.in_chans={recipe.channels}")
    return recipe, spec


def validate_dino(cfg: DictConfig) -> tuple[Recipe, BackboneSpec, DinoSettings]:
    """Every check that needs no data: keys, recipe, backbone, settings, batch size against centring."""
    recipe, spec = validate_ssl(cfg)
    settings = dino_settings(cfg)
    batch = int(cfg.loader.batch_size)
    if batch < settings.min_batch_size:
        raise ConfigError(f"loader.batch_size={batch} is too small for DINO's centring: the centre is a running mean "
                          f"of the teacher's outputs over each batch, and below method.dino.min_batch_size="
                          f"{settings.min_batch_size} it follows single images (kNN accuracy slides at batch 4-20); "
                          f"raise loader.batch_size")
    return recipe, spec, settings


def check_pool(dm: RecipeDataModule, settings: DinoSettings) -> None:
    """A train split that can fill a batch for centring; a recipe of one image is refused by name."""
    recipe, total, n_train = dm.recipe, len(dm.prepare()), dm.split_size("train")
    if total == 1:
        raise DataError(f"data recipe {recipe.name!r} holds a single image: self-supervised pretraining learns by "
                        f"telling images apart within a batch; it needs at least method.dino.min_batch_size="
                        f"{settings.min_batch_size} training images")
    if n_train < settings.min_batch_size:
        raise DataError(f"data recipe {recipe.name!r} has {n_train} train images (splits {dm.split_sizes()}), fewer "
                        f"than method.dino.min_batch_size={settings.min_batch_size} that centring needs in a batch; "
                        f"add images or raise data.split.train")


def _patch_size(backbone) -> int | None:
    embed = getattr(backbone, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        return None
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def student_backbone(spec: BackboneSpec, recipe: Recipe, settings: DinoSettings):
    """The student's backbone and the crop plan; a ViT takes local views of another size through timm's
    ``dynamic_img_size`` (the saved architecture stays ``spec``: the weights are the same). Built once, so brought
    weights are read and fitted once."""
    built = spec
    family = family_of(spec.name)
    if settings.crops.local_views(recipe.image_size) and family.takes_img_size:
        built = dataclasses.replace(spec, kwargs={**built.kwargs, "dynamic_img_size": True})
    if family.zero_init_last and not (spec.pretrained or spec.checkpoint) and "zero_init_last" not in spec.kwargs:
        # a new ResNet with zeroed residual branches gives every image the same features (on a 28x28 image its
        # shortcut path reads one corner pixel): the EMA teacher then starts, and stays for hundreds of steps,
        # uniform, and the loss sits at ln K. Normal initial branches give it something to sharpen.
        built = dataclasses.replace(built, kwargs={**built.kwargs, "zero_init_last": False})
    backbone = create_backbone(built)
    check_input_size(backbone, spec, recipe.image_size, recipe.channels)
    plan = plan_crops(settings.crops, recipe.image_size, _patch_size(backbone))
    _check_crop_sizes(backbone, spec, plan, settings, recipe.channels)
    return backbone, plan


def _check_crop_sizes(backbone, spec: BackboneSpec, plan: CropPlan, settings: DinoSettings, channels: int) -> None:
    import torch

    sizes = [("global_size", plan.global_size)] + ([("local_size", plan.local_size)] if plan.n_local else [])
    was_training = backbone.training
    backbone.eval()
    try:
        for key, size in sizes:
            try:
                with torch.no_grad():
                    backbone(torch.zeros(2, channels, *size))
            except RuntimeError as e:
                raise ConfigError(f"method.dino.crops.{key}: backbone {spec.name!r} cannot take {size[0]}x{size[1]} "
                                  f"crops ({str(e).splitlines()[0][:120]}); raise it, or set "
                                  f"method.dino.crops.n_local=0") from None
    finally:
        backbone.train(was_training)


def pretrain_dino(cfg: DictConfig) -> StageResult:
    """Self-supervised DINO pretraining; see the module docstring. Raises FmtError on bad config or data before
    training, and :class:`CollapseError` when the collapse guard stops a run (its signals are written first)."""
    out = run_dir(cfg)
    recipe, spec, settings = validate_dino(cfg)
    resume = start_run(cfg)
    student, plan = student_backbone(spec, recipe, settings)
    dm = build_datamodule(recipe, cfg.loader, seed=cfg.seed, output_dir=out, require_labels=False)
    with RunRecord("pretrain", out, cfg) as record:
        check_pool(dm, settings)
        table, setup = record_run_data(record, cfg, dm, resume, DINO_SETUP_KEYS, spec.checkpoint)
        meta = headless_meta(student, spec, recipe, table, record, out, {
            "method": "dino", "prototypes": settings.prototypes,
            "crops": {"global_size": list(plan.global_size), "local_size": list(plan.local_size),
                      "n_local": plan.n_local}})
        scheduler = build(cfg.method.scheduler, "method.scheduler") if cfg.method.scheduler else None
        module = DinoModule(student, settings, plan.build(settings.crops),
                            build(cfg.method.optimizer, "method.optimizer"), scheduler, meta,
                            knn_monitor(dm, settings.knn), seed=cfg.seed)
        run = ssl_trainer(cfg, out, setup, record)
        record.set("trainable_parameters", sum(p.numel() for p in module.student.parameters()))
        try:
            fit_seconds = fit_ssl(run, module, dm, resume, out)
        except CollapseError as e:  # raised on every rank at the same step (the signals are global)
            if not run.trainer.is_global_zero:
                raise
            files = _record_signals(out, module, spec, recipe, {"collapsed": {"signal": e.signal, "error": str(e)}})
            for role, path in files.items():
                record.add_output(path, role)
            raise
        if not run.trainer.is_global_zero:  # the model, scores and metrics are rank 0's to write
            return StageResult("pretrain", out, {"stage": "pretrain", "rank": run.trainer.global_rank}, {})
        files, test = save_and_score(module.teacher_backbone, meta, recipe, dm, out, cfg, settings.knn,
                                     f"{spec.name} DINO on {recipe.name} test")
        metrics = ssl_metrics("dino", meta, spec, recipe, dm, run, fit_seconds, test, knn_verdict(module, spec.name))
        files.update(_record_signals(out, module, spec, recipe, metrics))
        outputs = record_outputs(record, run, files, test, dm)
    return StageResult("pretrain", out, metrics, {role: Path(path) for role, path in outputs.items()})


# the steps every self-supervised stage (DINO, JEPA) shares: seeding, the data and its record, the head-less model
# header, the kNN monitor, trainer and checkpoints, fitting, saving, the test kNN score and the metrics


def start_run(cfg: DictConfig) -> Path | None:
    """The process's rank checked, ``resume=`` resolved and the seed set; returns the checkpoint to resume."""
    rank_and_world()
    resume = resolve_resume(cfg.resume)
    # before the backbone: its initial weights must not depend on what this process drew before (a
    # data-parallel run's rank 0 and a single process start alike)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return resume


def record_run_data(record: RunRecord, cfg: DictConfig, dm: RecipeDataModule, resume: Path | None,
                    setup_keys: tuple[str, ...], checkpoint: str | None, **facts: Any) -> tuple[Any, dict[str, Any]]:
    """The data recipe and fingerprint in the run record, the run's setup (``facts`` beside the config under
    ``setup_keys``) checked against a resumed checkpoint's; returns (table, setup)."""
    recipe, table = dm.recipe, dm.prepare()
    record.set_data(recipe.name, recipe.to_dict(), table.fingerprint)
    setup = setup_fingerprint(cfg, setup_keys, recipe, table.fingerprint, **facts)
    record_training_inputs(record, cfg, resume, setup, checkpoint)
    return table, setup


def headless_meta(backbone, spec: BackboneSpec, recipe: Recipe, table: Any, record: RunRecord, out: Path,
                  pretraining: dict[str, Any]) -> dict[str, Any]:
    """The header of the saved model: ``backbone`` without a head, and how it was pretrained."""
    meta = model_meta(Classifier(backbone, 0), spec, task=recipe.task, classes=None,
                      preprocess=Preprocess.from_recipe(recipe), run_id=record.data["run_id"],
                      run_dir=str(out.resolve()), recipe=recipe.name, data_fingerprint=table.fingerprint)
    meta["pretraining"] = pretraining
    return meta


def knn_monitor(dm: RecipeDataModule, settings: KnnSettings) -> KnnMonitor | None:
    """The per-epoch kNN accuracy on the val split, when the recipe has labels and a val split."""
    if not _knn_ready(dm):
        return None
    return KnnMonitor(lambda: dm.dataloader("train"), lambda: dm.dataloader("val"), len(dm.prepare().classes),
                      settings)


@dataclasses.dataclass
class SslTrainer:
    """A self-supervised stage's trainer and the callbacks it reads after fitting."""

    trainer: pl.Trainer
    checkpoint: Any
    throughput: TrainThroughput


def ssl_trainer(cfg: DictConfig, out: Path, setup: dict[str, Any], record: RunRecord) -> SslTrainer:
    """The trainer, checkpointing ``last.ckpt`` every epoch (there is no val/loss to pick a best by)."""
    throughput = TrainThroughput()
    ckpt = checkpoint_callback(OmegaConf.merge(cfg, {"checkpoint": {"monitor": None}}), out / "checkpoints")
    callbacks = [ckpt, SetupFingerprint(setup, record.data["run_id"]), EpochSeed(cfg.seed), throughput,
                 *extra_callbacks(cfg)]
    trainer = build_trainer(cfg, callbacks=callbacks, logger=build_logger(cfg), default_root_dir=out)
    return SslTrainer(trainer, ckpt, throughput)


def fit_ssl(run: SslTrainer, module: pl.LightningModule, dm: RecipeDataModule, resume: Path | None,
            out: Path) -> float:
    """Train on the train split (resuming ``resume``); returns the seconds it took."""
    started = time.perf_counter()
    with metrics_history(out, resuming=resume is not None):  # a resumed run keeps the rows logged before
        run.trainer.fit(module, train_dataloaders=_per_process(dm.dataloader("train", shuffle=True), run.trainer),
                        ckpt_path=str(resume) if resume else None, weights_only=True)
    return time.perf_counter() - started


def save_and_score(backbone, meta: dict[str, Any], recipe: Recipe, dm: RecipeDataModule, out: Path, cfg: DictConfig,
                   knn: KnnSettings, title: str) -> tuple[dict[str, Path], dict[str, Any] | None]:
    """Save ``backbone`` without a head (``model.safetensors`` + ``model.json``) and, with labels and a test split,
    score its kNN accuracy there; returns (files, test scores or None)."""
    model = Classifier(backbone, 0).eval()
    files = dict(zip(("weights", "model"), save_model(model, meta, out)))
    test = (score_features(model, recipe, dm, split="test", protocol="knn",
                           settings={"k": knn.k, "temperature": knn.temperature}, out_dir=out, seed=int(cfg.seed),
                           title=title)
            if _knn_ready(dm) and dm.split_size("test") else None)
    return files, test


def ssl_metrics(method: str, meta: dict[str, Any], spec: BackboneSpec, recipe: Recipe, dm: RecipeDataModule,
                run: SslTrainer, fit_seconds: float, test: dict[str, Any] | None,
                verdict: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics every self-supervised stage writes; the stage adds its own signals."""
    trainer, per_epoch = run.trainer, run.throughput.per_epoch
    return {
        "stage": "pretrain", "method": method, "task": meta["task"], "backbone": spec.name, "recipe": recipe.name,
        "backbone_weights": meta["backbone_weights"],  # where the initial weights came from, what was adapted
        "epochs": trainer.current_epoch, "global_step": trainer.global_step, "fit_seconds": round(fit_seconds, 2),
        "train_images_per_s": {"median": statistics.median(per_epoch) if per_epoch else None,
                               "per_epoch": [round(v, 1) for v in per_epoch]},
        "last_epoch": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "test": ({"protocol": "knn", **{k: v for k, v in test.items() if k != "files"}} if test else None),
        "knn_val": verdict,
        "data": dm.summary(),
    }


def record_outputs(record: RunRecord, run: SslTrainer, files: dict[str, Path], test: dict[str, Any] | None,
                   dm: RecipeDataModule) -> dict[str, Any]:
    """Every file the run wrote, in its record; returns them by role."""
    outputs = {**files, **(test["files"] if test else {}), **dm.files}
    if run.checkpoint.last_model_path:
        outputs["last_checkpoint"] = run.checkpoint.last_model_path
    for role, path in outputs.items():
        record.add_output(path, role)
    return outputs


def _per_process(loader: DataLoader, trainer: pl.Trainer) -> DataLoader:
    """Under data parallelism, process r takes every world-th image of the one-process order (the run's seeded
    shuffle): the processes' batches together are the one-process batch of the same global size, which is what
    makes a run on N processes train like one (Lightning's own sampler would shuffle that order again)."""
    if trainer.world_size == 1:
        return loader
    sampler = DistributedSamplerWrapper(loader.sampler, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                        shuffle=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      persistent_workers=loader.persistent_workers, drop_last=loader.drop_last)


def knn_verdict(module: Any, backbone: str, method: str = "DINO", baseline: str = "the starting weights",
                advice: str | None = None) -> dict[str, Any] | None:
    """The model's kNN accuracy on the val split at the start (``module.initial_knn``: for DINO the starting
    weights, random or brought; for JEPA its frozen teacher) and at the end; a run that did not raise it is a
    warning, since its model is no better a start than the one it began from (None without labels)."""
    start = module.initial_knn
    end = module.history[-1].get("knn_val_accuracy") if module.history else None
    if start is None or end is None:
        return None
    helped = end > start
    if helped:
        log.info("%s: kNN accuracy on the val split %.4f -> %.4f", method, start, end)
    else:
        advice = advice or ("train longer (trainer.max_epochs), or change method.dino.* (teacher_temp, prototypes, "
                            "momentum_start, crops) or method.optimizer.lr")
        log.warning("%s did not help: the kNN accuracy on the val split is %.4f after pretraining and %.4f with %s "
                    "of %s; %s", method, end, start, baseline, backbone, advice)
    return {"initial": start, "final": end, "gain": end - start, "helped": helped}


def _knn_ready(dm: RecipeDataModule) -> bool:
    """The per-epoch kNN accuracy needs class labels and a val split."""
    table = dm.prepare()
    return (not table.unlabelled and dm.recipe.task == "classification" and dm.split_size("val") > 0
            and dm.split_size("train") > 0)


def _record_signals(out: Path, module: DinoModule, spec: BackboneSpec, recipe: Recipe,
                    metrics: dict[str, Any]) -> dict[str, Path]:
    """``metrics.json`` with the per-epoch collapse signals, ``collapse_signals.png`` and the training curves."""
    history = module.history
    # a run stopped mid-epoch has no epoch record yet: its steps so far are what the user needs to see
    partial = module._steps if metrics.get("collapsed") and module._steps else []
    metrics["dino"] = {"prototypes": module.settings.prototypes, "epochs": history, "steps_of_last_epoch": partial,
                       # epochs whose teacher spread its batches over too few prototypes (warned, not stopped)
                       "partial_collapse_epochs": [r["epoch"] for r in history if r.get("partial_collapse")]}
    files = {"metrics": write_json_atomic(out / "metrics.json", metrics)}
    title = f"{spec.name} DINO on {recipe.name}"
    plot = collapse_signals_png(history, partial, module.settings.prototypes, out / "collapse_signals.png", title)
    if plot:
        files["collapse_signals"] = plot
    curves = training_curves_png(out / "logs" / "metrics.csv", out / "training_curves.png", title)
    if curves:
        files["training_curves"] = curves
    return files
