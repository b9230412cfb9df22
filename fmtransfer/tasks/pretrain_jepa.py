"""``pretrain method=jepa``: a JEPA-style second stage on top of a frozen teacher (a ``pretrain method=dino`` run).

    fmtransfer pretrain method=jepa method.jepa.teacher=runs/dino data=mnist_global backbone=vit_tiny

The student has the teacher's architecture (``backbone=`` must name it: another is refused, both named) and starts
from its weights (``method.jepa.init=teacher``) or at random. Writes the student's backbone without a head
(``model.safetensors`` + ``model.json``, ``num_outputs`` 0, ``pretraining.teacher`` naming the teacher and its
sha256), ``checkpoints/``, ``metrics.json`` with the loss of every epoch (and, with labels, the student's kNN
accuracy on the val split against the teacher's) and, with labels, the kNN score of the test split.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fmtransfer.config import build, build_dataclass, require
from fmtransfer.data import build_datamodule
from fmtransfer.data.recipe import Recipe
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage import RunRecord, write_json_atomic
from fmtransfer.lineage.io import sha256_file
from fmtransfer.lineage.record import RUN_FILE
from fmtransfer.models.backbone import WEIGHTS_ATTR, BackboneSpec, create_backbone
from fmtransfer.models.classifier import Classifier, load_model, resolve_model_path
from fmtransfer.models.families import auto_patch_size, family_of
from fmtransfer.models.jepa import MIN_TOKENS, JepaModule, JepaSettings, token_grid
from fmtransfer.models.weights import WeightsRecord
from fmtransfer.plots import training_curves_png
from fmtransfer.tasks.common import model_run_dir, run_dir
from fmtransfer.tasks.pretrain_dino import (
    fit_ssl,
    headless_meta,
    knn_monitor,
    knn_verdict,
    record_outputs,
    record_run_data,
    save_and_score,
    ssl_metrics,
    ssl_trainer,
    start_run,
    validate_ssl,
)
from fmtransfer.tasks.result import StageResult

# the config that makes a checkpoint this run's, with the data and the teacher's weights (their sha256)
JEPA_SETUP_KEYS = ("seed", "backbone", "method", "loader.batch_size")
# what fixes a backbone's weights' shapes and meaning; drop_path_rate (a training regulariser) may differ
ARCHITECTURE_KEYS = ("name", "in_chans", "img_size", "patch_size", "kwargs")
JEPA_ADVICE = ("train longer (trainer.max_epochs), or change method.jepa.mask, method.jepa.predictor or "
               "method.optimizer.lr; until then the teacher is the better model")


def is_jepa(cfg: DictConfig) -> bool:
    """Whether the ``method`` group asks for the JEPA stage (``method=jepa``: it has a ``jepa`` node)."""
    return "jepa" in cfg.method


def jepa_settings(cfg: DictConfig) -> JepaSettings:
    require(cfg, "method.jepa")
    return build_dataclass(JepaSettings, cfg.method.jepa, "method.jepa")


def validate_jepa(cfg: DictConfig) -> tuple[Recipe, BackboneSpec, JepaSettings]:
    """Every check that needs neither data nor the teacher: keys, recipe, backbone, settings."""
    recipe, spec = validate_ssl(cfg)
    settings = jepa_settings(cfg)
    if not settings.teacher:
        raise ConfigError("method.jepa.teacher is required: the frozen teacher, a `fmtransfer pretrain method=dino` "
                          "run dir or its model.json / model.safetensors (method.jepa.teacher=runs/dino)")
    if spec.pretrained or spec.checkpoint:
        where = "backbone.pretrained=true" if spec.pretrained else f"backbone.checkpoint={spec.checkpoint}"
        raise ConfigError(f"{where}: JEPA's student starts from method.jepa.init={settings.init} (the teacher's "
                          f"weights, or random ones); unset it")
    return recipe, spec, settings


def load_teacher(settings: JepaSettings, spec: BackboneSpec) -> tuple[Classifier, dict[str, Any], Path]:
    """The teacher named by ``method.jepa.teacher`` (weights checked against its header's sha256), refused when its
    architecture is not the student's ``backbone``. Returns (model, its header, its model.json)."""
    try:
        path = resolve_model_path(settings.teacher)
    except ArtifactError as e:
        raise ArtifactError(f"method.jepa.teacher={settings.teacher}: {e}") from None
    if path.suffix == ".ckpt":
        raise ArtifactError(f"method.jepa.teacher={settings.teacher}: {path} is a training checkpoint; the teacher is "
                            f"a saved model: a finished `pretrain method=dino` run dir, its model.json or "
                            f"model.safetensors")
    teacher, meta = load_model(path)
    check_architecture(spec, meta["backbone"], path)
    return teacher, meta, path


def check_architecture(spec: BackboneSpec, teacher: dict[str, Any], path: Path) -> None:
    """The student is the teacher's architecture: it starts from (or is measured against) the teacher's weights.

    Raises:
        ConfigError: naming each differing ``backbone.*`` key, this run's value and the teacher's.
    """
    ours = spec.architecture()
    differ = [k for k in ARCHITECTURE_KEYS if json.dumps(_resolved(ours, k), sort_keys=True)
              != json.dumps(_resolved(teacher, k), sort_keys=True)]
    if differ:
        shown = "; ".join(f"backbone.{k}={ours.get(k)!r} here, {teacher.get(k)!r} in the teacher" for k in differ)
        raise ConfigError(f"backbone {spec.name!r} is not the architecture of method.jepa.teacher {teacher['name']!r} "
                          f"({path}): {shown}. The student has the teacher's architecture: pass the backbone= the "
                          f"teacher was trained with (e.g. backbone.name={teacher['name']})")


def _resolved(architecture: dict[str, Any], key: str) -> Any:
    """``architecture[key]``, with ``patch_size: auto`` as the size it builds (auto and 4 are the same ViT at 28 px)."""
    value = architecture.get(key)
    if key == "patch_size" and value == "auto" and family_of(str(architecture.get("name"))).takes_patch_size:
        return auto_patch_size(tuple(architecture.get("img_size") or (224, 224)))
    return value


def check_grid(backbone, spec: BackboneSpec, recipe: Recipe) -> tuple[int, int]:
    """The token grid of the recipe's images; fewer than ``MIN_TOKENS`` positions leave nothing to predict."""
    grid = token_grid(backbone, recipe.image_size, recipe.channels)
    if grid[0] * grid[1] < MIN_TOKENS:
        h, w = recipe.image_size
        raise ConfigError(f"JEPA needs a token grid of at least {MIN_TOKENS} positions, but backbone {spec.name!r} "
                          f"reduces data recipe {recipe.name!r}'s {h}x{w} images to {grid[0]}x{grid[1]}; use a ViT "
                          f"with a small backbone.patch_size (backbone=vit_tiny: patch 4 gives 7x7 at 28 px) for "
                          f"both stages, or bigger images (data.image_size)")
    return grid


def student_from(teacher: Classifier, spec: BackboneSpec, settings: JepaSettings, path: Path, meta: dict[str, Any]):
    """The student's backbone: a separate copy of the teacher's (``init=teacher``) or a new one."""
    if settings.init == "random":
        return create_backbone(spec)
    student = copy.deepcopy(teacher.backbone).train()
    record = WeightsRecord("jepa_teacher", str(path.resolve()), meta["weights_sha256"])
    setattr(student, WEIGHTS_ATTR, record.to_dict())
    return student


def pretrain_jepa(cfg: DictConfig) -> StageResult:
    """The JEPA stage; see the module docstring. Raises FmtError on bad config, teacher or data before training."""
    out = run_dir(cfg)
    recipe, spec, settings = validate_jepa(cfg)
    resume = start_run(cfg)
    teacher, teacher_meta, teacher_path = load_teacher(settings, spec)
    grid = check_grid(teacher.backbone, spec, recipe)
    student = student_from(teacher, spec, settings, teacher_path, teacher_meta)
    dm = build_datamodule(recipe, cfg.loader, seed=cfg.seed, output_dir=out, require_labels=False)
    with RunRecord("pretrain", out, cfg) as record:
        table, setup = record_run_data(record, cfg, dm, resume, JEPA_SETUP_KEYS, None,
                                       teacher_sha256=teacher_meta["weights_sha256"])
        _record_teacher(record, teacher_path, teacher_meta)
        meta = headless_meta(student, spec, recipe, table, record, out, {
            "method": "jepa", "init": settings.init, "grid": list(grid), "loss": settings.loss,
            "teacher": {"path": str(teacher_path.resolve()), "sha256": sha256_file(teacher_path),
                        "weights_sha256": teacher_meta["weights_sha256"],
                        "method": (teacher_meta.get("pretraining") or {}).get("method", "supervised")},
            "mask": dataclasses.asdict(settings.mask), "predictor": dataclasses.asdict(settings.predictor)})
        scheduler = build(cfg.method.scheduler, "method.scheduler") if cfg.method.scheduler else None
        module = JepaModule(student, teacher.backbone, settings, grid, build(cfg.method.optimizer, "method.optimizer"),
                            scheduler, meta, knn_monitor(dm, settings.knn), seed=cfg.seed)
        run = ssl_trainer(cfg, out, setup, record)
        record.set("trainable_parameters", sum(p.numel() for p in module.parameters() if p.requires_grad))
        fit_seconds = fit_ssl(run, module, dm, resume, out)
        if not run.trainer.is_global_zero:  # the model, scores and metrics are rank 0's to write
            return StageResult("pretrain", out, {"stage": "pretrain", "rank": run.trainer.global_rank}, {})
        files, test = save_and_score(module.student, meta, recipe, dm, out, cfg, settings.knn,
                                     f"{spec.name} JEPA on {recipe.name} test")
        verdict = knn_verdict(module, spec.name, method="JEPA", baseline="its frozen teacher", advice=JEPA_ADVICE)
        metrics = ssl_metrics("jepa", meta, spec, recipe, dm, run, fit_seconds, test, verdict)
        metrics["jepa"] = {"teacher": meta["pretraining"]["teacher"], "grid": list(grid), "epochs": module.history}
        files["metrics"] = write_json_atomic(out / "metrics.json", metrics)
        curves = training_curves_png(out / "logs" / "metrics.csv", out / "training_curves.png",
                                     f"{spec.name} JEPA on {recipe.name}")
        if curves:
            files["training_curves"] = curves
        outputs = record_outputs(record, run, files, test, dm)
    return StageResult("pretrain", out, metrics, {role: Path(path) for role, path in outputs.items()})


def _record_teacher(record: RunRecord, path: Path, meta: dict[str, Any]) -> None:
    """The teacher's header and weights as inputs, and the run that trained it as a parent."""
    record.add_input(path, "teacher")
    record.add_input(path.parent / meta["weights"], "teacher_weights")
    parent = model_run_dir(path, meta)
    if parent is not None and (parent / RUN_FILE).is_file():
        record.add_parent(parent)
