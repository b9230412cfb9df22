"""``adapt``: a small regional adapter over a global base, from a few hundred local labels."""

from __future__ import annotations

import csv
import io
import logging
import math
import shutil
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from fmtransfer.adapters.artifact import ADAPTER_FILE, adapted_meta, save_adapter
from fmtransfer.adapters.calibration import (
    Strategy,
    parse_strategy,
    select_diverse,
    select_random,
    select_stratified,
)
from fmtransfer.adapters.head import region_head
from fmtransfer.adapters.methods import AdapterMethod, adapter_state, trainable_count
from fmtransfer.config import build
from fmtransfer.data import Preprocess, RecipeDataModule, load_recipe
from fmtransfer.errors import ConfigError
from fmtransfer.lineage import RunRecord, write_json_atomic, write_text_atomic
from fmtransfer.models.classifier import load_model, resolve_model_path
from fmtransfer.models.families import family_of
from fmtransfer.models.module import EpochSeed, SupervisedModule
from fmtransfer.tasks.common import (
    build_augment,
    build_logger,
    build_trainer,
    checkpoint_callback,
    embed,
    extra_callbacks,
    resolve_resume,
    run_dir,
)
from fmtransfer.tasks.evaluate import _model_run_dir, check_fit, score_model

log = logging.getLogger(__name__)


def choose_calibration(dm: RecipeDataModule, model, strategy: Strategy, size: int, seed: int,
                       accelerator: str = "auto") -> np.ndarray:
    """Table rows of the calibration set, drawn from the train split only (never val or test)."""
    table = dm.prepare()
    pool = table.indices("train")
    if strategy is Strategy.RANDOM:
        pick = select_random(len(pool), size, seed)
    elif strategy is Strategy.STRATIFIED:
        strata = table.targets[pool] if table.classes is not None else np.zeros(len(pool), dtype=np.int64)
        pick = select_stratified(strata, list(table.ids[pool]), size, seed)
    else:
        pick = select_diverse(embed(model, dm.dataloader("train"), accelerator), size, seed)
    return pool[pick]


def validate_adapt(cfg: DictConfig):
    """Checks that need no data or base: recipe, method, strategy, steps, size, loss."""
    recipe = load_recipe(cfg.data)
    method: AdapterMethod = build(cfg.adapter.method, "adapter.method")
    strategy = parse_strategy(cfg.calibration.strategy)
    steps = int(cfg.adapter.steps)
    if steps < 1:
        raise ConfigError(f"adapter.steps={steps} must be >= 1")
    size = cfg.calibration.size
    if size is not None and int(size) < 1:
        raise ConfigError(f"calibration.size={size} must be a positive integer (or null: the whole train split)")
    loss_name = str(cfg.loss.get("_target_", ""))
    if recipe.task == "regression" and "CrossEntropy" in loss_name:
        raise ConfigError(f"data recipe {recipe.name!r} is a regression task: set loss._target_=torch.nn.HuberLoss")
    return recipe, method, strategy, steps


def adapt(cfg: DictConfig) -> dict[str, Any]:
    """Choose a calibration set, train the adapter, save ``adapter.safetensors``, score the region's test split.

    Every check that can fail (recipe, method, calibration size, method vs backbone) runs before anything is
    written, so bad input leaves no partial artifact.
    """
    recipe, method, strategy, steps = validate_adapt(cfg)
    base_path = resolve_model_path(cfg.base)
    model, base_meta = load_model(base_path)
    backbone_name = base_meta["backbone"]["name"]
    if method.name == "vpt" and not family_of(backbone_name).prompts:
        raise ConfigError(f"adapter=vpt needs a Vision Transformer, but the base backbone {backbone_name!r} is of "
                          f"the {family_of(backbone_name).name!r} family; use adapter=lora for it")
    check_fit(recipe, base_meta)
    dm = RecipeDataModule(recipe, batch_size=cfg.loader.batch_size, num_workers=cfg.loader.num_workers,
                          preprocess=Preprocess.from_dict(base_meta["preprocess"]), seed=cfg.seed)
    table = dm.prepare()
    pool = len(table.indices("train"))
    size = pool if cfg.calibration.size is None else int(cfg.calibration.size)
    if size > pool:
        raise ConfigError(f"calibration.size={size} is larger than the train split of {recipe.name!r} ({pool} "
                          f"samples; val and test are never used for calibration)")
    resume = resolve_resume(cfg.get("resume"))

    out = run_dir(cfg)
    files = dm.write_manifests(out / "data")
    with RunRecord("adapt", out, cfg) as record:
        record.add_input(base_path, "base")
        if (parent := _model_run_dir(base_path, base_meta)) is not None:
            record.add_parent(parent)
        record.set_data(recipe.name, recipe.to_dict(), table.fingerprint)
        accelerator = cfg.get("accelerator", "auto")

        zero_shot = None
        if table.classes == base_meta["classes"]:
            zero_shot = score_model(model, base_meta, recipe, split="test", out_dir=out / "zero_shot", datamodule=dm,
                                    accelerator=accelerator, title=f"zero-shot on {recipe.name}")
            zero_shot = {k: v for k, v in zero_shot.items() if k != "files"}

        rows = choose_calibration(dm, model, strategy, size, int(cfg.calibration.seed), accelerator)
        dm.use_rows("train", rows)
        files["calibration"] = out / "calibration.csv"
        write_text_atomic(files["calibration"], _calibration_csv(table, rows))

        model.head, head_note = region_head(model.head, base_meta["classes"], table.classes, method.reuse_head)
        method.attach(model, backbone_name)
        for p in model.head.parameters():
            p.requires_grad = True
        trainable, total = trainable_count(model)
        header = {
            "method": method.describe(), "config": OmegaConf.to_container(cfg.adapter, resolve=True),
            "base": {"sha256": base_meta["weights_sha256"], "path": str(base_path.resolve()),
                     "backbone": backbone_name, "run_id": base_meta.get("lineage", {}).get("run_id")},
            "task": recipe.task, "classes": table.classes, "num_outputs": dm.num_outputs,
            "preprocess": base_meta["preprocess"], "head": head_note,
            "calibration": {"size": size, "strategy": strategy.value, "seed": int(cfg.calibration.seed)},
            "trainable_parameters": trainable, "total_parameters": total,
            "lineage": {"run_id": record.data["run_id"], "run_dir": str(out.resolve()), "recipe": recipe.name,
                        "data_fingerprint": table.fingerprint},
        }
        meta = adapted_meta(base_meta, header)

        batches = max(1, size // dm.batch_size) if size > dm.batch_size else 1
        epochs = math.ceil(steps / batches)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = SupervisedModule(model, recipe.task, build(cfg.loss, "loss"), build(cfg.adapter.optimizer,
                                  "adapter.optimizer"), build(cfg.scheduler, "scheduler") if cfg.get("scheduler")
                                  else None, meta, build_augment(cfg), seed=cfg.seed,
                                  frozen_norm_stats=method.norm_stats == "frozen")
        ckpt = checkpoint_callback(cfg, out / "checkpoints", every_n_epochs=max(1, epochs // max(1, cfg.checkpoints)))
        trainer_cfg = OmegaConf.merge(cfg, {"trainer": {"max_epochs": epochs, "max_steps": steps,
                                                        "limit_val_batches": 0, "num_sanity_val_steps": 0,
                                                        "log_every_n_steps": min(50, steps)}})
        logger = build_logger(cfg)
        trainer = build_trainer(trainer_cfg, callbacks=[ckpt, EpochSeed(cfg.seed), *extra_callbacks(cfg)],
                                logger=logger, default_root_dir=out)
        log.info("adapter %s over %s: %d of %d parameters trainable (%.2f%%); %d calibration samples (%s); %s",
                 method.name, backbone_name, trainable, total, 100 * trainable / total, size, strategy.value,
                 head_note)
        if logger:
            logger.log_hyperparams({"method": method.name, "calibration_size": size, "trainable_parameters": trainable,
                                    "trainable_fraction": trainable / total})
        module.train()  # the base was loaded for inference
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=dm.dataloader("train", shuffle=True),
                    ckpt_path=str(resume) if resume else None, weights_only=True)
        fit_seconds = time.perf_counter() - started

        files["adapter"] = save_adapter(out / ADAPTER_FILE, adapter_state(model, method), header)
        model.eval()
        test = score_model(model, meta, recipe, split="test", out_dir=out, datamodule=dm, accelerator=accelerator,
                           title=f"{method.name} ({size} labels) on {recipe.name}")
        # the val split (never trained on) is where settings should be compared, leaving test untouched
        val = (score_model(model, meta, recipe, split="val", out_dir=out, datamodule=dm, accelerator=accelerator,
                           title=f"{method.name} ({size} labels) on {recipe.name} val")
               if dm.split_size("val") else None)
        adapter_bytes = files["adapter"].stat().st_size
        base_bytes = (base_path.parent / base_meta["weights"]).stat().st_size if base_meta.get("weights") \
            else base_path.stat().st_size
        metrics = {
            "stage": "adapt", "method": method.name, "recipe": recipe.name, "base": str(base_path),
            "calibration": header["calibration"], "steps": steps, "seed": cfg.seed, "head": head_note,
            "trainable_parameters": trainable, "total_parameters": total,
            "trainable_fraction": trainable / total, "adapter_bytes": adapter_bytes, "base_bytes": base_bytes,
            "adapter_to_base": adapter_bytes / base_bytes, "fit_seconds": round(fit_seconds, 2),
            "zero_shot": zero_shot, "test": {k: v for k, v in test.items() if k != "files"},
            "val": {k: v for k, v in val.items() if k != "files"} if val else None,
        }
        write_json_atomic(out / "metrics.json", metrics)
        outputs = {**files, "metrics": out / "metrics.json", **test["files"],
                   **{f"val_{k}": v for k, v in (val or {}).get("files", {}).items()}}
        for role, path in outputs.items():
            record.add_output(path, role)
        if cfg.get("keep_checkpoints", False) and ckpt.last_model_path:
            record.add_output(ckpt.last_model_path, "last_checkpoint")
        elif (out / "checkpoints").is_dir():
            shutil.rmtree(out / "checkpoints")  # whole-model resume state, useless once the adapter exists
    return {"run_dir": str(out), "adapter": str(files["adapter"]), "metrics": metrics}


def _calibration_csv(table, rows: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "label", "region"])
    for r in rows:
        label = table.classes[table.targets[r]] if table.classes is not None else f"{table.targets[r]:.6g}"
        w.writerow([table.ids[r], label, table.regions[r]])
    return buf.getvalue()
