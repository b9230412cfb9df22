"""``export``: a model (optionally + an adapter, merged) -> ONNX fp32 -> INT8 -> gates -> metadata -> release.

    fmtransfer export model=outputs/pretrain/<run> [adapter=<adapter.safetensors>] export.quantize=static

The run dir gets ``model.onnx`` (fp32) and, when quantizing, ``model.int8.onnx``, each with a sidecar
``.onnx.json``; ``triton/<name>/`` (a Triton model repository of the released model); ``export.md`` and
``metrics.json`` (sizes, latency, accuracy, gates); ``monitoring/`` (each released file's monitoring reference
statistics, for ``predict monitor.enabled=true``). With ``export.embedding_output`` a model with a head has a second
output ``embedding`` (its pre-head features), gated like the first. When a gate fails the ONNX files go to
``rejected/`` with ``reason.json`` instead, and the stage raises :class:`GateFailed` (the CLI exits non-zero).

A release is per run: every file (ONNX, sidecars, the Triton repository or ``rejected/``) is made in ``.staging/``
first; then whatever an earlier export left in the run dir is withdrawn and the new files are moved in, each
sidecar before its model and the Triton repository as one folder, so no reader pairs files of two exports and a
rejected re-export leaves no stale released model behind.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fmtransfer.adapters.harm import describe, release_check
from fmtransfer.adapters.loading import allow_unfinished, load_model_or_adapted, require_model_or_adapter
from fmtransfer.config import build_dataclass, require, run_dir
from fmtransfer.data import Recipe, RecipeDataModule, build_datamodule, load_recipe
from fmtransfer.data.table import read_manifest
from fmtransfer.errors import ConfigError, DataError, FmtError
from fmtransfer.export.gates import (
    accuracy_gate,
    agreement,
    agreement_gate,
    embedding_gate,
    floor_gate,
    parity_gate,
)
from fmtransfer.export.latency import measure_latency
from fmtransfer.export.onnx_export import (
    EMBEDDING_OUTPUT,
    INPUT_NAME,
    embed_metadata,
    export_onnx,
    output_name,
    output_names,
)
from fmtransfer.export.quantize import Quantize, fp32_nodes, quantize_model
from fmtransfer.export.runtime import (
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    SIDECAR_DIGEST,
    OnnxModel,
    create_session,
    sidecar_path,
)
from fmtransfer.export.settings import ExportSettings
from fmtransfer.export.triton import write_repository
from fmtransfer.lineage import RunRecord, sha256_file, write_json_atomic, write_text_atomic
from fmtransfer.lineage.io import seal_header
from fmtransfer.models.classifier import EMBEDDING_TASK
from fmtransfer.models.families import family_of
from fmtransfer.models.probes import knn_loo_accuracy
from fmtransfer.tasks.common import record_sources, score
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)

FP32_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"
REJECTED_DIR, TRITON_DIR, REASON_FILE = "rejected", "triton", "reason.json"
REFERENCE_DIR = "monitoring"  # where `fmtransfer monitor` looks for a model's reference statistics


class GateFailed(FmtError):
    """An export failed a gate; its files are under ``rejected/`` and ``result`` describes the run."""

    def __init__(self, message: str, result: StageResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class _Inputs:
    """What an export reads: the model (an adapter merged in), its header and lineage, the INT8 mode it gets, and
    the gate recipe read with the model's preprocessing."""

    model: torch.nn.Module
    meta: dict[str, Any]
    lineage: dict[str, Any]
    mode: Quantize
    recipe: Recipe
    dm: RecipeDataModule
    calibration_rows: np.ndarray | None
    do_no_harm: dict[str, Any] | None = None  # an adapter's do-no-harm verdict as released (forced or not)


@dataclass
class _Converted:
    """Staged ONNX files by precision, their sessions, the fp32 parity check and the INT8 choices made."""

    staging: Path
    files: dict[str, Path]
    sessions: dict[str, OnnxModel]
    parity_x: np.ndarray
    parity: dict[str, Any]
    kept: list[str]
    bias_corrected: bool


@dataclass
class _Scored:
    """Every variant over the gate split: outputs (and ``embedding`` outputs where the export has them),
    accuracy, gates, latency."""

    outputs: dict[str, np.ndarray]
    targets: np.ndarray
    accuracy: dict[str, float]
    gates: list[dict[str, Any]]
    latency: dict[str, dict]
    embeddings: dict[str, np.ndarray]

    @property
    def passed(self) -> bool:
        return all(g["passed"] for g in self.gates)


def export_settings(cfg: DictConfig) -> ExportSettings:
    """The ``export`` group, every key and value checked; its defaults live in configs/export/default.yaml only."""
    require(cfg, "export")
    return build_dataclass(ExportSettings, cfg.export, "export")


def export(cfg: DictConfig) -> StageResult:
    """Export, quantize, gate and release (or reject) a model; see the module docstring.

    Raises:
        GateFailed: a gate failed; the files are under ``rejected/`` and the exception carries the result.
    """
    settings, recipe = _check(cfg)
    out = run_dir(cfg)
    with RunRecord("export", out, cfg) as record:
        inputs = _load_inputs(cfg, settings, recipe, record, out)
        converted = _convert(inputs, settings, out / ".staging")
        scored = _score(inputs, converted, settings, cfg)
        result = _record(out, inputs, converted, scored, settings, record, cfg)
        if not scored.passed:
            raise GateFailed(_rejection(scored.gates, out / "rejected"), result)
    return result


def _check(cfg: DictConfig) -> tuple[ExportSettings, Recipe]:
    """Everything that needs no model or data: the keys, the ``export`` settings and the recipe."""
    require(cfg, "seed", "model", "adapter_file", "data", "loader", "force")
    require_model_or_adapter(cfg.model, cfg.adapter_file)
    allow_unfinished(cfg)
    forced(cfg)
    return export_settings(cfg), load_recipe(cfg.data)


def forced(cfg: DictConfig) -> bool:
    """The ``force`` key (release an adapter that does not beat its base), checked to be a bool."""
    value = cfg.force
    if not isinstance(value, bool):
        raise ConfigError(f"force={value!r}: expected true or false")
    return value


def _load_inputs(cfg: DictConfig, settings: ExportSettings, recipe: Recipe, record: RunRecord,
                 out: Path) -> _Inputs:
    model, meta, lineage, harm = _load(cfg, record)
    if meta["task"] == EMBEDDING_TASK and recipe.task != "classification":
        raise ConfigError(f"model {cfg.model} has no head: its export is gated on the kNN accuracy of its embeddings, "
                          f"which needs a labelled classification recipe; {recipe.name!r} is a {recipe.task} task")
    mode = settings.quantize
    if mode is Quantize.AUTO:
        mode = Quantize(family_of(meta["backbone"]["name"]).int8)
    dm = build_datamodule(recipe, cfg.loader, model_meta=meta, model_classes=True, output_dir=out)
    table = dm.prepare()
    record.set_data(recipe.name, recipe.to_dict(), table.fingerprint)
    rows = _calibration_rows(settings, int(cfg.seed), dm) if mode is Quantize.STATIC else None
    return _Inputs(model, meta, lineage, mode, recipe, dm, rows, harm)


def _load(cfg: DictConfig, record: RunRecord) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any],
                                                      dict[str, Any] | None]:
    """The model to export (adapter merged in), its header, lineage hashes for the metadata and, with an adapter (or
    a model ``merge`` made of one), its do-no-harm verdict (an adapter that does not beat its base is refused here
    unless ``force=true``)."""
    loaded = load_model_or_adapted(cfg.model, cfg.adapter_file, merge=True, allow_unfinished=allow_unfinished(cfg))
    record_sources(record, loaded)
    model, meta, header = loaded.model, loaded.meta, loaded.adapter
    harm = release_check(header, forced(cfg), header["path"]) if header is not None else None
    if header is None and meta.get("lineage", {}).get("adapter_sha256"):  # a merged adapter: its own check holds
        harm = release_check({"do_no_harm": meta.get("do_no_harm")}, forced(cfg),
                             f"{meta['lineage']['adapter_sha256'][:12]} (merged into {cfg.model})")
    if harm is not None:
        record.set("do_no_harm", harm)
    if header is not None:
        lineage = {"base_sha256": header["base"]["sha256"], "adapter_sha256": header["weights_sha256"],
                   "adapter_method": header["method"]["name"], "recipe": header["lineage"].get("recipe")}
    else:
        lineage = {"base_sha256": meta.get("lineage", {}).get("base_sha256", meta["weights_sha256"]),
                   "adapter_sha256": meta.get("lineage", {}).get("adapter_sha256"),
                   "model_sha256": meta["weights_sha256"], "recipe": meta.get("lineage", {}).get("recipe")}
    return model.eval().float().cpu(), meta, lineage, harm


def _collect(dm: RecipeDataModule, split: str, limit: int | None = None) -> np.ndarray:
    """Preprocessed inputs of ``split`` (in order) as (N, C, H, W) float32, at most ``limit``."""
    parts, n = [], 0
    for x, _, _ in dm.dataloader(split):
        parts.append(x.numpy())
        n += len(x)
        if limit is not None and n >= limit:
            break
    return np.concatenate(parts)[:limit]


def _calibration_rows(settings: ExportSettings, seed: int, dm: RecipeDataModule) -> np.ndarray:
    """Rows for static calibration: the ids of ``export.calibration.manifest`` (a CSV with an ``id`` column,
    e.g. an adapter's calibration.csv or a curated manifest), else a seeded sample of the calibration split."""
    table = dm.prepare()
    cal = settings.calibration
    if cal.manifest:
        path = Path(cal.manifest).expanduser()
        ids = [r["id"] for r in read_manifest(path, "export.calibration.manifest")]
        index = {str(i): k for k, i in enumerate(table.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise DataError(f"{path}: {len(missing)} ids are not in recipe {dm.recipe.name!r}, e.g. {missing[:3]}")
        rows = np.array([index[i] for i in ids], dtype=np.int64)
        leaked = rows[table.splits[rows] == settings.split]
        if len(leaked):
            raise DataError(f"{path}: {len(leaked)} ids are in the {settings.split!r} split used by the gates; "
                            f"calibrating on them would hide quantization errors")
        return rows
    pool = table.indices(cal.split)
    size = min(cal.size, len(pool))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=size, replace=False))


def _convert(inputs: _Inputs, settings: ExportSettings, staging: Path) -> _Converted:
    """ONNX fp32, checked against PyTorch on real inputs, and its INT8 version, written into ``staging``."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model, dm, mode = inputs.model, inputs.dm, inputs.mode
    parity_x = _collect(dm, settings.split, settings.parity_samples)
    files = {"fp32": export_onnx(model, torch.from_numpy(parity_x[:2]), staging / FP32_FILE, task=inputs.meta["task"],
                                 opset=settings.opset, exporter=settings.exporter,
                                 embedding=settings.embedding_output)}
    sessions = {"onnx_fp32": _session(files["fp32"], inputs.meta["task"])}
    with torch.inference_mode():
        reference = model(torch.from_numpy(parity_x)).float().numpy()
    parity = parity_gate(reference, sessions["onnx_fp32"].run(parity_x), settings.gates)
    kept: list[str] = []
    bias_corrected = mode is Quantize.STATIC and settings.calibration.bias_correction
    if mode is not Quantize.NONE:
        calibration = None
        kept = fp32_nodes(files["fp32"], settings.keep_fp32.nodes(mode))
        if inputs.calibration_rows is not None:
            dm.use_rows(settings.calibration.split, inputs.calibration_rows)
            calibration = _collect(dm, settings.calibration.split)
        files["int8"] = quantize_model(files["fp32"], staging / INT8_FILE, mode, input_name=INPUT_NAME,
                                       calibration=calibration, per_channel=settings.per_channel,
                                       method=settings.calibration.method, keep_fp32=kept,
                                       bias_correction=bias_corrected)
        sessions["onnx_int8"] = _session(files["int8"], inputs.meta["task"])
    return _Converted(staging, files, sessions, parity_x, parity, kept, bias_corrected)


def _score(inputs: _Inputs, converted: _Converted, settings: ExportSettings, cfg: DictConfig) -> _Scored:
    """Every variant over the gate split: accuracy (R^2 for regression), the gates, latency."""
    task, classes = inputs.meta["task"], inputs.meta["classes"]
    outputs, embeddings, targets = _outputs(inputs.model, converted.sessions, inputs.dm, settings.split)
    accuracy = {k: _metric(task, v, targets, len(classes) if classes else None) for k, v in outputs.items()}
    gates = [converted.parity]
    for variant in ("onnx_fp32", "onnx_int8"):  # the second output, gated like the first
        if variant in embeddings:
            gates.append(embedding_gate(embeddings["pytorch"], embeddings[variant], variant[5:], settings.gates))
    if "onnx_int8" in outputs:
        if task == "classification":
            gates.append(agreement_gate(outputs["onnx_fp32"], outputs["onnx_int8"], settings.gates))
        gates.append(accuracy_gate(accuracy["pytorch"], accuracy["onnx_int8"], _metric_name(task), settings.gates))
    if settings.gates.min_accuracy is not None:  # the file that would be released, on its own
        final = "onnx_int8" if "onnx_int8" in outputs else "onnx_fp32"
        gates.append(floor_gate(accuracy[final], _metric_name(task),
                                "ONNX INT8" if final == "onnx_int8" else "ONNX fp32", settings.gates))
    latency = measure_latency(inputs.model, {f"onnx_{k}": f for k, f in converted.files.items()},
                              converted.parity_x, settings.latency, input_name=INPUT_NAME)
    return _Scored(outputs, targets, accuracy, gates, latency, embeddings)


def _outputs(model: torch.nn.Module, sessions: dict[str, OnnxModel], dm: RecipeDataModule, split: str):
    """Outputs of PyTorch and every ONNX variant over ``split`` (streamed in batches), their ``embedding`` outputs
    where the ONNX files have them (PyTorch's: ``model.features``, from the same forward pass) and the targets."""
    names = next(iter(sessions.values())).output_names
    outs: dict[str, list[np.ndarray]] = {"pytorch": [], **{k: [] for k in sessions}}
    embs: dict[str, list[np.ndarray]] = {k: [] for k in outs} if EMBEDDING_OUTPUT in names[1:] else {}
    targets = []
    with torch.inference_mode():
        for x, y, _ in dm.dataloader(split):
            if embs:
                features = model.features(x)
                outs["pytorch"].append(model.head(features).float().numpy())
                embs["pytorch"].append(features.float().numpy())
            else:
                outs["pytorch"].append(model(x).float().numpy())
            for name, sess in sessions.items():
                got = sess.run_outputs(x.numpy(), names[:2] if embs else names[:1])
                outs[name].append(got[0])
                if embs:
                    embs[name].append(got[1])
            targets.append(y.numpy())
    return ({k: np.concatenate(v) for k, v in outs.items()}, {k: np.concatenate(v) for k, v in embs.items()},
            np.concatenate(targets))


def _metric_name(task: str) -> str:
    return {"classification": "accuracy", EMBEDDING_TASK: "kNN accuracy"}.get(task, "R^2")


def _metric(task: str, outputs: np.ndarray, targets: np.ndarray, num_classes: int | None) -> float:
    if task == EMBEDDING_TASK:  # a head-less backbone: how well its embeddings keep the split's classes apart
        return knn_loo_accuracy(outputs, targets)
    m = score(task, outputs, targets, num_classes)
    return float(m["accuracy"] if task == "classification" else m["r2"])


def _record(out: Path, inputs: _Inputs, converted: _Converted, scored: _Scored, settings: ExportSettings,
            record: RunRecord, cfg: DictConfig) -> StageResult:
    """Metadata into every ONNX file and its sidecar; the files released into the run dir (or ``rejected/``), a
    Triton repository when released; ``metrics.json``, ``export.md`` and the run record's outputs."""
    recipe, meta, mode = inputs.recipe, inputs.meta, inputs.mode
    passed = scored.passed
    lineage = {**inputs.lineage, "recipe_fingerprint": inputs.dm.prepare().fingerprint, "gate_recipe": recipe.name,
               "run_id": record.data["run_id"], "run_dir": str(out.resolve())}
    names = output_names(meta["task"], settings.embedding_output)
    base_meta = {"format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "task": meta["task"],
                 "classes": meta["classes"],
                 "num_outputs": int(meta["num_outputs"]) or int(meta["embed_dim"]), "preprocess": meta["preprocess"],
                 "input_name": INPUT_NAME, "output_name": output_name(meta["task"]), "output_names": names,
                 "embedding": _embedding_meta(meta, names), "input_layout": "NCHW",
                 "backbone": meta["backbone"]["name"], "exporter": settings.exporter, "opset": settings.opset,
                 "lineage": lineage, "gates": scored.gates, "gates_passed": passed,
                 **({"do_no_harm": inputs.do_no_harm} if inputs.do_no_harm is not None else {})}
    staged = _stage(converted, base_meta, mode)
    triton = None
    if passed and settings.triton:
        name = settings.name or _default_name(recipe.name, lineage)
        triton = write_repository(converted.staging / TRITON_DIR, name, staged.get("int8", staged["fp32"]),
                                  {**base_meta, "precision": "final"}, settings.triton_max_batch_size)
    reason = None if passed else {"failed": [g for g in scored.gates if not g["passed"]], "gates": scored.gates}
    released = _release(converted.staging, staged, out, reason)
    metrics = _metrics(inputs, converted, scored, settings, lineage, released)
    if passed:
        metrics["monitoring_reference"] = _references(cfg, out, released, settings, record)
    outputs: dict[str, Path] = {"model": released.get("int8", released["fp32"])}
    if triton is not None:
        outputs["triton"] = out / TRITON_DIR / triton.name
        metrics["triton"] = str(outputs["triton"])
        for f in sorted(outputs["triton"].rglob("*")):
            if f.is_file():
                record.add_output(f, "triton")
    if not passed:
        outputs["rejection"] = out / REJECTED_DIR / REASON_FILE
        record.add_output(outputs["rejection"], "rejection")
    outputs["metrics"] = write_json_atomic(out / "metrics.json", metrics)
    summary = _summary(metrics)
    title = f"# fmtransfer export: {'released' if passed else 'REJECTED'}"
    outputs["report"] = write_text_atomic(out / "export.md", f"{title}\n\n{summary}\n")
    for role, path in {"metrics": outputs["metrics"], "report": outputs["report"], **inputs.dm.files}.items():
        record.add_output(path, role)
    for precision, path in released.items():
        outputs[f"onnx_{precision}"] = path
        record.add_output(path, f"onnx_{precision}" + ("" if passed else "_rejected"))
        record.add_output(sidecar_path(path), f"sidecar_{precision}")
    return StageResult("export", out, metrics, outputs, [("Edge export", summary)])


def _stage(converted: _Converted, base_meta: dict[str, Any], mode: Quantize) -> dict[str, Path]:
    """Embed the sealed metadata into each staged file and write its sealed sidecar beside it, in staging."""
    for precision, path in converted.files.items():
        onnx_meta = {**base_meta, "precision": precision, "quantize": mode.value if precision == "int8" else "none"}
        if precision == "int8":
            onnx_meta["fp32_nodes"] = converted.kept
            onnx_meta["bias_correction"] = converted.bias_corrected
        sealed = embed_metadata(path, onnx_meta)
        write_json_atomic(sidecar_path(path), seal_header(
            {**sealed, "file": path.name, "bytes": path.stat().st_size, "onnx_sha256": sha256_file(path)},
            SIDECAR_DIGEST))
    return dict(converted.files)


def _withdraw(out: Path) -> None:
    """Remove what an earlier export released or rejected in ``out``: each model before its sidecar."""
    for name in (FP32_FILE, INT8_FILE):
        for path in (out / name, sidecar_path(out / name)):
            path.unlink(missing_ok=True)
    for folder in (out / TRITON_DIR, out / REJECTED_DIR, out / REFERENCE_DIR):
        shutil.rmtree(folder, ignore_errors=True)


def _release(staging: Path, staged: dict[str, Path], out: Path, reason: dict[str, Any] | None) -> dict[str, Path]:
    """Withdraw the earlier export's files, then move this run's in: released files into ``out`` (each sidecar
    before its model, the Triton repository as one folder), or the rejected ones as one ``rejected/`` folder
    with ``reason.json``. Returns the final path of each precision's ONNX file."""
    _withdraw(out)
    if reason is not None:
        folder = staging / REJECTED_DIR
        folder.mkdir()
        for path in staged.values():
            for src in (sidecar_path(path), path):
                src.replace(folder / src.name)
        write_json_atomic(folder / REASON_FILE, reason)
        folder.replace(out / REJECTED_DIR)
        released = {precision: out / REJECTED_DIR / path.name for precision, path in staged.items()}
    else:
        for path in staged.values():
            for src in (sidecar_path(path), path):
                src.replace(out / src.name)
        if (staging / TRITON_DIR).is_dir():
            (staging / TRITON_DIR).replace(out / TRITON_DIR)
        released = {precision: out / path.name for precision, path in staged.items()}
    shutil.rmtree(staging, ignore_errors=True)
    return released


def _metrics(inputs: _Inputs, converted: _Converted, scored: _Scored, settings: ExportSettings,
             lineage: dict[str, Any], released: dict[str, Path]) -> dict[str, Any]:
    task, mode, outputs = inputs.meta["task"], inputs.mode, scored.outputs
    sizes = {k: path.stat().st_size for k, path in released.items()}
    variants = [("pytorch", "PyTorch eager fp32", None), ("onnx_fp32", "ONNX fp32", FP32_FILE),
                ("onnx_int8", f"ONNX INT8 ({mode.value})", INT8_FILE)]
    rows = [{"variant": label, "file": f, "mb": sizes.get("fp32" if k == "onnx_fp32" else "int8", 0) / 1e6 if f
             else None, "accuracy": scored.accuracy[k], **scored.latency[k]}
            for k, label, f in variants if k in scored.accuracy]
    int8 = "onnx_int8" in outputs
    return {"stage": "export", "task": task, "recipe": inputs.recipe.name, "split": settings.split,
            "n_test": int(len(scored.targets)), "quantize": mode.value, "exporter": settings.exporter,
            "fp32_nodes": converted.kept, "bias_correction": converted.bias_corrected,
            "calibration_method": settings.calibration.method if mode is Quantize.STATIC else None,
            "passed": scored.passed, "gates": scored.gates, "variants": rows, "sizes_bytes": sizes,
            "int8_to_fp32_size": sizes["int8"] / sizes["fp32"] if int8 else None,
            "int8_fp32_agreement": agreement(outputs["onnx_fp32"], outputs["onnx_int8"])
            if int8 and task == "classification" else None,
            # RMS difference of the INT8 outputs (logits) from ONNX fp32's: finer than top-1 agreement
            "int8_fp32_rmse": float(np.sqrt(np.mean((outputs["onnx_int8"] - outputs["onnx_fp32"]) ** 2)))
            if int8 else None,
            "lineage": lineage, "files": {k: str(v) for k, v in released.items()},
            "do_no_harm": inputs.do_no_harm}


def _rejection(gates: list[dict[str, Any]], folder: Path) -> str:
    failed = "; ".join(f"{g['name']} {g['value']:.4g} (limit {g['threshold']:g})" for g in gates if not g["passed"])
    return f"export rejected: {failed}. The files are in {folder} with reason.json"


def _references(cfg: DictConfig, out: Path, released: dict[str, Path], settings: ExportSettings,
                record: RunRecord) -> dict[str, Any]:
    """Monitoring reference statistics beside each released ONNX file (``export.reference``), computed with that
    file itself (INT8 embeddings differ from fp32's, and a device compares its own outputs), so ``predict
    monitor.enabled=true`` needs no training data. Skipped, with a log line, for a file without embeddings."""
    if not settings.reference.enabled:
        return {}
    from fmtransfer.config import to_plain
    from fmtransfer.tasks.model_outputs import open_model
    from fmtransfer.tasks.monitor import default_settings, store_reference

    monitor_settings = default_settings()
    recipe = to_plain(cfg.data)
    written = {}
    for precision, path in released.items():
        runner = open_model(path)
        if not runner.gives_embeddings:
            log.info("no monitoring reference for %s: it has no embedding output (export.embedding_output=true "
                     "adds one)", path)
            continue
        stats = store_reference(runner, recipe, settings.reference.split, out / REFERENCE_DIR,
                                settings=monitor_settings, batch_size=int(cfg.loader.batch_size),
                                max_bank=settings.reference.max_bank, seed=int(cfg.seed))
        for kind, file in stats.files.items():
            record.add_output(file, f"reference_{precision}_{kind}")
        written[precision] = {"json": stats.files["json"], "n": stats.data["n"], "bank": stats.data["ood_bank"],
                              "ood_threshold": stats.ood.threshold if stats.ood else None,
                              "bytes": sum(Path(p).stat().st_size for p in stats.files.values())}
    return written


def _session(path: Path, task: str) -> OnnxModel:
    """A staged file, before its metadata exists (so no metadata or sidecar checks)."""
    return OnnxModel(path, {"input_name": INPUT_NAME, "output_name": output_name(task)}, create_session(path))


def _embedding_meta(meta: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    """What the metadata says of the ``embedding`` output (None: the file has none)."""
    if EMBEDDING_OUTPUT not in names:
        return None
    return {"name": EMBEDDING_OUTPUT, "dim": int(meta["embed_dim"]), "shape": ["batch", int(meta["embed_dim"])],
            "dtype": "float32", "what": "the backbone's pre-head features (the head's input), not normalised",
            "output_index": names.index(EMBEDDING_OUTPUT)}


def _default_name(recipe: str, lineage: dict[str, Any]) -> str:
    method = lineage.get("adapter_method") or "base"
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in f"{recipe}_{method}")


def _summary(m: dict[str, Any]) -> str:
    """The variants and gates as markdown: the body of ``export.md`` and the pipeline report's section."""
    metric = _metric_name(m["task"])
    lines = [f"Scored on `{m['recipe']}` / {m['split']} ({m['n_test']} images); INT8 mode `{m['quantize']}`, "
             f"exporter `{m['exporter']}`" + (f"; kept in fp32: {', '.join(f'`{n}`' for n in m['fp32_nodes'])}"
                                              if m.get("fp32_nodes") else "")
             + (f"; calibration `{m['calibration_method']}`" if m.get("calibration_method") else "")
             + ("; bias-corrected" if m.get("bias_correction") else "") + ".", "",
             f"| variant | file | size (MB) | batch-1 latency (ms) | batch-32 latency (ms) | {metric} |",
             "|---|---|---:|---:|---:|---:|"]
    for r in m["variants"]:
        b1 = next((v for k, v in r.items() if k.startswith("batch_1_")), float("nan"))
        b32 = next((v for k, v in r.items() if k.startswith("batch_32_")), float("nan"))
        size = f"{r['mb']:.2f}" if r["mb"] is not None else ""
        lines.append(f"| {r['variant']} | {r['file'] or ''} | {size} | {b1:.2f} | {b32:.2f} | {r['accuracy']:.4f} |")
    harm = m.get("do_no_harm")
    if harm is not None:
        lines += ["", f"Do no harm (the adapter against its base): {describe(harm)}"
                  + ("; **released with force=true**" if harm.get("forced") else "") + "."]
    refs = m.get("monitoring_reference")
    if refs:
        lines += ["", "Outputs `logits` and `embedding` (the pre-head features, for monitoring on the device). Monitoring "
                  "reference beside each file (`fmtransfer predict monitor.enabled=true` and `fmtransfer monitor` "
                  "use it): " + "; ".join(
                      f"{precision}: `monitoring/{Path(r['json']).name}` ({r['n']} reference samples, OOD bank "
                      f"{r['bank']}, threshold {r['ood_threshold']:.4f}, {r['bytes'] / 1e6:.1f} MB)"
                      for precision, r in refs.items()) + "."]
    lines += ["", "Latency: median of repeated runs on this machine's CPU.", "",
              "| gate | value | limit | passed |", "|---|---:|---:|---|"]
    for g in m["gates"]:
        lines.append(f"| {g['name']} ({g['detail']}) | {g['value']:.4g} | {g['threshold']:g} | "
                     f"{'yes' if g['passed'] else '**no**'} |")
    return "\n".join(lines)
