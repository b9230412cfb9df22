"""``adapt``'s regional pretraining step (``regional_pretrain.epochs > 0``): DINO on the region's whole train split,
labels unused, over the base with the adapter method attached, before the adapter is fitted from the calibration
labels (ExPLoRA, Khanna et al. 2024). See :mod:`fmtransfer.adapters.regional` for what trains and what is saved.

Whether it helped is measured twice: the kNN accuracy of the backbone's features on the region's val split (the
calibration samples, with their labels, as the bank) before and after it, and (``regional_pretrain.compare``) the
adapter fitted without it, scored beside this one (:func:`verdict`); a drop is a warning and ``helped: false``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from omegaconf import DictConfig, open_dict

from fmtransfer.adapters.methods import AdapterMethod, trainable_count
from fmtransfer.adapters.regional import (
    REGIONAL_FILE,
    RegionalPretrainSettings,
    check_regional_method,
    freeze,
    read_regional,
    regional_state,
    save_regional,
    unfreeze_regional,
)
from fmtransfer.config import build, build_dataclass, require, to_plain
from fmtransfer.data import RecipeDataModule
from fmtransfer.errors import ConfigError
from fmtransfer.lineage import RunRecord, write_json_atomic
from fmtransfer.models.backbone import BackboneSpec, create_backbone
from fmtransfer.models.classifier import Classifier
from fmtransfer.models.dino import CollapseError, DinoModule, plan_crops
from fmtransfer.models.families import family_of
from fmtransfer.models.inference import embed
from fmtransfer.models.module import EpochSeed
from fmtransfer.models.probes import knn_scores
from fmtransfer.plots import collapse_signals_png
from fmtransfer.tasks.common import build_trainer, extra_callbacks
from fmtransfer.tasks.pretrain_dino import check_pool

log = logging.getLogger(__name__)

SIGNALS_FILE = "regional_pretrain.json"
SIGNALS_PLOT = "regional_pretrain_signals.png"
_T = TypeVar("_T")


def _own_keys(call: Callable[[], _T]) -> _T:
    """Run ``call``; DINO's messages name its settings under ``method.``, here they live under ``regional_pretrain.``."""
    def renamed(message: str) -> str:
        return message.replace("method.dino.", "regional_pretrain.dino.").replace(
            "method.optimizer.", "regional_pretrain.optimizer.")

    try:
        return call()
    except CollapseError as e:
        raise CollapseError(f"regional pretraining: {renamed(str(e))}", e.signal) from None
    except ConfigError as e:
        raise ConfigError(renamed(str(e))) from None


def regional_settings(cfg: DictConfig) -> RegionalPretrainSettings:
    """``regional_pretrain``, every key checked (its DINO keys are ``configs/method/dino.yaml``'s)."""
    names = [f.name for f in dataclasses.fields(RegionalPretrainSettings)]
    require(cfg, *(f"regional_pretrain.{n}" for n in names))
    node = to_plain(cfg.regional_pretrain)
    return _own_keys(lambda: build_dataclass(RegionalPretrainSettings, {n: node[n] for n in names}, "regional_pretrain"))


def check_regional(settings: RegionalPretrainSettings, method: AdapterMethod, batch_size: int) -> None:
    """Checks that need no data: the method, and a batch that centring can average over."""
    check_regional_method(settings, method.name)
    if settings.epochs and int(batch_size) < settings.dino.min_batch_size:
        raise ConfigError(f"loader.batch_size={batch_size} is too small for regional pretraining: DINO's centre is a "
                          f"mean over each batch, and needs regional_pretrain.dino.min_batch_size="
                          f"{settings.dino.min_batch_size}; raise loader.batch_size")


def fit_for_crops(model: Classifier, base_meta: dict[str, Any], settings: RegionalPretrainSettings) -> None:
    """A ViT takes DINO's smaller local views only with timm's ``dynamic_img_size``: rebuild its backbone so, with the
    base's weights (the parameters are the same, so the adapter still fits the base as saved). Call before the
    method is attached."""
    image_size = base_meta["preprocess"]["image_size"]
    if not settings.epochs or settings.reuse or not settings.dino.crops.local_views(image_size):
        return
    spec = BackboneSpec(**base_meta["backbone"])
    if not family_of(spec.name).takes_img_size:
        return
    twin = create_backbone(dataclasses.replace(spec, kwargs={**spec.kwargs, "dynamic_img_size": True}))
    twin.load_state_dict(model.backbone.state_dict())
    model.backbone = twin.eval()


@dataclass
class Regional:
    """What regional pretraining did: its ``record`` (adapter header and metrics), the parameters it trained beyond
    the method's (``extra``: frozen now, saved in the adapter), the files it wrote and, once measured, the scores of
    the adapter fitted without it."""

    record: dict[str, Any]
    extra: list[str]
    files: dict[str, Path]
    without: dict[str, Any] | None = None  # the adapter fitted without it: {"val", "test"} overall metrics


@dataclass
class RegionalContext:
    """The run ``regional_pretrain`` works in: the config, the region's data (train rows: the calibration set), the
    base's header and path, the run dir, its record, the inference device and ``allow_unfinished``."""

    cfg: DictConfig
    dm: RecipeDataModule
    base_meta: dict[str, Any]
    base_path: Path
    out: Path
    run: RunRecord
    accelerator: str
    allow_unfinished: bool
    resume: Path | None = None


def regional_pretrain(ctx: RegionalContext, settings: RegionalPretrainSettings, model: Classifier,
                      method: AdapterMethod) -> Regional:
    """Pretrain (or take an earlier run's pretraining) with the method attached to ``model``; the kNN accuracy of the
    features on val, before and after, is recorded. Leaves ``model`` ready for the supervised fit."""
    backbone_name = ctx.base_meta["backbone"]["name"]
    extra = unfreeze_regional(model, backbone_name, settings.trainable)
    trainable = trainable_count(model.backbone)[0]
    reuse = settings.reuse or _resumed_regional(ctx.resume)
    taken = (read_regional(reuse, model, method, ctx.base_meta["weights_sha256"], settings.trainable,
                           ctx.allow_unfinished) if reuse else None)
    before = feature_knn(model, ctx, settings)
    files: dict[str, Path] = {}
    if taken is not None:
        record, state = taken
        model.load_state_dict(state, strict=False)
        log.info("regional pretraining taken from %s (%s epochs there)", record["reused_from"], record.get("epochs"))
    else:
        record = _pretrain(ctx, settings, model, trainable)
        lineage = {"run_id": ctx.run.data["run_id"], "run_dir": str(ctx.out.resolve())}
        base = {"sha256": ctx.base_meta["weights_sha256"], "path": str(ctx.base_path.resolve()), "backbone": backbone_name}
        files["regional_pretrain"] = save_regional(ctx.out / REGIONAL_FILE, model, method, base,
                                                   ctx.base_meta["preprocess"], record, lineage)
    after = feature_knn(model, ctx, settings)
    freeze(model, extra)
    record = {**record, "feature_knn_val": {"before": before, "after": after}}
    if before is not None and after is not None:
        log.log(logging.WARNING if after < before else logging.INFO, "regional pretraining: kNN accuracy of the "
                "features on the region's val split %.3f -> %.3f (the calibration samples as the bank)", before, after)
    return Regional(record, extra, files)


def verdict(task: str, with_: dict[str, Any], without: dict[str, Any]) -> dict[str, Any]:
    """The adapter with regional pretraining against the one without: the metric on val (where settings are compared;
    test when there is no val split) decides ``helped``, and a drop is a warning.

    Args:
        with_, without: ``{"val": overall metrics or None, "test": overall metrics}`` of the two adapters.
    """
    key = "accuracy" if task == "classification" else "r2"
    split = "val" if with_["val"] is not None else "test"
    a, b = without[split][key], with_[split][key]
    helped = bool(b >= a)
    if not helped:
        log.warning("regional pretraining did not help: the adapter's %s %s is %.4f with it and %.4f without (test: "
                    "%.4f vs %.4f); use regional_pretrain.epochs=0 for this region, or change regional_pretrain.* "
                    "(epochs, trainable, optimizer.lr, dino.*)", split, key, b, a, with_["test"][key],
                    without["test"][key])
    else:
        log.info("regional pretraining: the adapter's %s %s is %.4f with it and %.4f without", split, key, b, a)
    return {"metric": key, "decided_on": split, "helped": helped,
            "without": {s: without[s][key] if without[s] else None for s in ("val", "test")},
            "with": {s: with_[s][key] if with_[s] else None for s in ("val", "test")}}


def _resumed_regional(resume: Path | None) -> Path | None:
    """A resumed run takes the regional pretraining its earlier attempt saved (the checkpoint holds the weights)."""
    if resume is None:
        return None
    saved = resume.parent.parent / REGIONAL_FILE
    return saved if saved.is_file() else None


def feature_knn(model: Classifier, ctx: RegionalContext, settings: RegionalPretrainSettings) -> float | None:
    """kNN accuracy of ``model``'s features on the val split, the calibration samples as the labelled bank (None for
    regression or without a val split)."""
    dm = ctx.dm
    table = dm.prepare()
    if table.classes is None or table.unlabelled or not dm.split_size("val"):
        return None
    bank = embed(model, dm.dataloader("train"), ctx.accelerator)
    queries = embed(model, dm.dataloader("val"), ctx.accelerator)
    scores = knn_scores(bank, table.targets[dm.rows("train")], queries, len(table.classes), settings.dino.knn.k,
                        settings.dino.knn.temperature)
    return float((scores.argmax(1) == table.targets[dm.rows("val")]).mean())


def _pretrain(ctx: RegionalContext, settings: RegionalPretrainSettings, model: Classifier,
              trainable: int) -> dict[str, Any]:
    """DINO over the whole train split (the calibration subset is served again afterwards); the teacher (the EMA of
    the student) is what ``model`` keeps."""
    cfg, dm, dino = ctx.cfg, ctx.dm, settings.dino
    table = dm.prepare()
    _own_keys(lambda: check_pool(dm, dino))
    embed_module = getattr(model.backbone, "vit", model.backbone)
    patch = getattr(getattr(embed_module, "patch_embed", None), "patch_size", None)
    plan = _own_keys(lambda: plan_crops(dino.crops, list(dm.preprocess.image_size),
                                        int(patch[0]) if isinstance(patch, (tuple, list)) else patch))
    scheduler = build(settings.scheduler, "regional_pretrain.scheduler") if settings.scheduler else None
    module = DinoModule(model.backbone, dino, plan.build(dino.crops),
                        build(settings.optimizer, "regional_pretrain.optimizer"), scheduler, seed=int(cfg.seed))
    trainer_cfg = copy.deepcopy(cfg)
    with open_dict(trainer_cfg):  # no checkpoints: adapt's own go to checkpoints/, and this step takes minutes
        trainer_cfg.trainer.merge_with({"max_epochs": settings.epochs, "max_steps": -1, "limit_val_batches": 0,
                                        "num_sanity_val_steps": 0, "enable_checkpointing": False,
                                        "enable_model_summary": False})
    trainer = build_trainer(trainer_cfg, callbacks=[EpochSeed(int(cfg.seed)), *extra_callbacks(cfg)], logger=False,
                            default_root_dir=ctx.out)
    calibration = dm.rows("train")
    dm.use_rows("train", table.indices("train"))
    images = len(table.indices("train"))
    log.info("regional pretraining: DINO for %d epochs on the %d train images of %s, labels unused; %d parameters "
             "trainable (%s)", settings.epochs, images, dm.recipe.name, trainable, settings.trainable)
    module.train()
    started = time.perf_counter()
    try:
        _own_keys(lambda: trainer.fit(module, train_dataloaders=dm.dataloader("train", shuffle=True)))
    except CollapseError as e:
        _write_signals(ctx, module, {"collapsed": {"signal": e.signal, "error": str(e)}})
        raise
    finally:
        dm.use_rows("train", calibration)
    seconds = time.perf_counter() - started
    _take_teacher(model, module)
    last = module.history[-1] if module.history else {}
    record = {"method": "dino", "epochs": settings.epochs, "steps": int(trainer.global_step), "images": images,
              "trainable": settings.trainable, "trainable_parameters": trainable, "seconds": round(seconds, 2),
              "final_signals": {k: _finite(last.get(k)) for k in ("loss", "ln_prototypes", "teacher_entropy",
                                                                    "teacher_mean_entropy", "kl", "embedding_std",
                                                                    "healthy_std")}}
    _write_signals(ctx, module, {"regional_pretrain": record})
    return record


def _take_teacher(model: Classifier, module: DinoModule) -> None:
    """The teacher's trained parameters and BatchNorm statistics into ``model``. Only those: the EMA of a frozen
    weight (m t + (1 - m) t) drifts from it by rounding, and the adapter file must not depend on weights it omits."""
    teacher = module.teacher_backbone.state_dict()
    keep = {f"backbone.{k}" for k in teacher} & set(regional_state(model))
    model.backbone.load_state_dict({k.removeprefix("backbone."): teacher[k.removeprefix("backbone.")] for k in keep},
                                   strict=False)


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _write_signals(ctx: RegionalContext, module: DinoModule, summary: dict[str, Any]) -> None:
    """The per-epoch collapse signals (``regional_pretrain.json``) and their plot, recorded as the run's outputs."""
    partial = module._steps if summary.get("collapsed") else []
    path = write_json_atomic(ctx.out / SIGNALS_FILE, {**summary, "prototypes": module.settings.prototypes,
                                                      "epochs": module.history, "steps_of_last_epoch": partial})
    ctx.run.add_output(path, "regional_pretrain_signals")
    plot = collapse_signals_png(module.history, partial, module.settings.prototypes, ctx.out / SIGNALS_PLOT,
                                f"regional pretraining (DINO) on {ctx.dm.recipe.name}")
    if plot:
        ctx.run.add_output(plot, "regional_pretrain_plot")
