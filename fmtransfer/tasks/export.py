"""``export``: a model (optionally + an adapter, merged) -> ONNX fp32 -> INT8 -> gates -> metadata -> release.

    fmtransfer export model=outputs/pretrain/<run> [adapter=<adapter.safetensors>] export.quantize=static

The run dir gets ``model.onnx`` (fp32) and, when quantizing, ``model.int8.onnx``, each with a sidecar
``.onnx.json``; ``triton/<name>/`` (a Triton model repository of the released model); ``export.md`` and
``metrics.json`` (sizes, latency, accuracy, gates). When a gate fails the ONNX files go to ``rejected/`` with
``reason.json`` instead, and the stage raises :class:`GateFailed` (the CLI exits non-zero).
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fmtransfer.config import build_dataclass, run_dir
from fmtransfer.data import Preprocess, RecipeDataModule, load_recipe
from fmtransfer.data.table import read_manifest
from fmtransfer.errors import ConfigError, DataError, FmtError
from fmtransfer.export.gates import GateSettings, accuracy_gate, agreement, agreement_gate, parity_gate
from fmtransfer.export.onnx_export import INPUT_NAME, embed_metadata, export_onnx, output_name
from fmtransfer.export.quantize import Quantize, fp32_nodes, quantize_model
from fmtransfer.export.runtime import ONNX_FORMAT, OnnxModel, create_session, sidecar_path
from fmtransfer.export.triton import write_repository
from fmtransfer.lineage import RunRecord, sha256_file, write_json_atomic, write_text_atomic
from fmtransfer.models.classifier import load_model, resolve_model_path
from fmtransfer.tasks.common import score
from fmtransfer.tasks.evaluate import check_fit, record_sources

FP32_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"


class GateFailed(FmtError):
    """An export failed a gate; its files are under ``rejected/``."""


def _load(cfg: DictConfig, record: RunRecord) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The model to export (adapter merged in) and its header; lineage hashes for the metadata."""
    if not cfg.get("model") and not cfg.get("adapter_file"):
        raise ConfigError("pass model=<run dir or model file> and/or adapter=<adapter file>")
    if cfg.get("adapter_file"):
        from fmtransfer.tasks.merge import load_adapted

        host, _, base_path, header = load_adapted(cfg.adapter_file, cfg.get("model"))
        model, meta = host.merge()
        record_sources(record, base_path, host.base_meta, header)
        lineage = {"base_sha256": header["base"]["sha256"], "adapter_sha256": header["weights_sha256"],
                   "adapter_method": header["method"]["name"], "recipe": header["lineage"].get("recipe")}
    else:
        path = resolve_model_path(cfg.model)
        model, meta = load_model(path)
        record_sources(record, path, meta)
        lineage = {"base_sha256": meta.get("lineage", {}).get("base_sha256", meta["weights_sha256"]),
                   "adapter_sha256": meta.get("lineage", {}).get("adapter_sha256"),
                   "model_sha256": meta["weights_sha256"], "recipe": meta.get("lineage", {}).get("recipe")}
    return model.eval().float().cpu(), meta, lineage


def _collect(dm: RecipeDataModule, split: str, limit: int | None = None) -> np.ndarray:
    """Preprocessed inputs of ``split`` (in order) as (N, C, H, W) float32, at most ``limit``."""
    parts, n = [], 0
    for x, _, _ in dm.dataloader(split):
        parts.append(x.numpy())
        n += len(x)
        if limit is not None and n >= limit:
            break
    return np.concatenate(parts)[:limit]


def _calibration_rows(cfg: DictConfig, dm: RecipeDataModule, gate_split: str) -> np.ndarray:
    """Rows for static calibration: the ids of ``export.calibration.manifest`` (a CSV with an ``id`` column,
    e.g. an adapter's calibration.csv or a curated manifest), else a seeded sample of the calibration split."""
    table = dm.prepare()
    cal = cfg.export.calibration
    if cal.get("manifest"):
        path = Path(cal.manifest).expanduser()
        ids = [r["id"] for r in read_manifest(path, "export.calibration.manifest")]
        index = {str(i): k for k, i in enumerate(table.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise DataError(f"{path}: {len(missing)} ids are not in recipe {dm.recipe.name!r}, e.g. {missing[:3]}")
        rows = np.array([index[i] for i in ids], dtype=np.int64)
        leaked = rows[table.splits[rows] == gate_split]
        if len(leaked):
            raise DataError(f"{path}: {len(leaked)} ids are in the {gate_split!r} split used by the gates; "
                            f"calibrating on them would hide quantization errors")
        return rows
    pool = table.indices(cal.split)
    size = min(int(cal.size), len(pool))
    rng = np.random.default_rng(int(cfg.seed))
    return np.sort(rng.choice(pool, size=size, replace=False))


def _outputs(model: torch.nn.Module, sessions: dict[str, OnnxModel], dm: RecipeDataModule, split: str):
    """Outputs of PyTorch and every ONNX variant over ``split`` (streamed in batches) and the targets."""
    outs: dict[str, list[np.ndarray]] = {"pytorch": [], **{k: [] for k in sessions}}
    targets = []
    with torch.inference_mode():
        for x, y, _ in dm.dataloader(split):
            outs["pytorch"].append(model(x).float().numpy())
            for name, sess in sessions.items():
                outs[name].append(sess.run(x.numpy()))
            targets.append(y.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}, np.concatenate(targets)


def _latency_ms(fns: dict[str, Any], x: np.ndarray, repeats: int, warmup: int, rounds: int) -> dict[str, float]:
    """Median wall time (milliseconds) of each ``fns[name](x)`` over ``repeats`` timed calls. The calls are made
    in ``rounds`` rounds in which every variant takes its turn (a block of ``warmup`` untimed calls, then its
    share of the timed ones), so that a slow spell of a shared machine hits all variants alike, and one runtime's
    idle threads (onnxruntime's spin after a run) do not slow the next variant's timed calls."""
    rounds = max(1, min(rounds, repeats))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        share = repeats // rounds + (r < repeats % rounds)
        for name, fn in fns.items():
            for _ in range(warmup):
                fn(x)
            for _ in range(share):
                t = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def _latencies(model, sessions: dict[str, OnnxModel], sample: np.ndarray, cfg: DictConfig) -> dict[str, dict]:
    lat = cfg.export.latency

    def torch_fn(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    runners = {"pytorch": torch_fn, **{k: (lambda x, s=s: s.session.run(None, {INPUT_NAME: x})) for k, s in sessions.items()}}
    result: dict[str, dict] = {name: {} for name in runners}
    for bs in lat.batch_sizes:
        x = np.ascontiguousarray(np.resize(sample, (int(bs), *sample.shape[1:])), dtype=np.float32)
        for name, ms in _latency_ms(runners, x, int(lat.repeats), int(lat.warmup), int(lat.get("rounds", 5))).items():
            result[name][f"batch_{bs}_ms"] = ms
    return result


def _metric(task: str, outputs: np.ndarray, targets: np.ndarray, num_classes: int | None) -> float:
    m = score(task, outputs, targets, num_classes)
    return float(m["accuracy"] if task == "classification" else m["r2"])


def validate_export(settings: DictConfig) -> tuple[Quantize, GateSettings]:
    """Check the ``export`` group before any work; returns the INT8 mode and the gate thresholds."""
    mode = Quantize.parse(settings.quantize)
    gates = build_dataclass(GateSettings, settings.gates, "export.gates")
    if settings.exporter not in ("torchscript", "dynamo"):
        raise ConfigError(f"export.exporter={settings.exporter!r}: choose torchscript or dynamo")
    if settings.calibration.split == settings.split:
        raise ConfigError(f"export.calibration.split={settings.calibration.split!r} is the split the gates score "
                          f"on (export.split); calibrate on train")
    keep = settings.get("keep_fp32") or {}
    if not isinstance(keep, Mapping) or set(keep) - {"static", "dynamic"} or any(
            isinstance(v, str) or not all(isinstance(k, str) for k in v or []) for v in keep.values()):
        raise ConfigError(f"export.keep_fp32={keep!r}: expected lists of node names or first/last per INT8 mode, "
                          f"e.g. export.keep_fp32.static=[first,last] export.keep_fp32.dynamic=[]")
    if not isinstance(settings.calibration.get("bias_correction", False), bool):
        raise ConfigError(f"export.calibration.bias_correction={settings.calibration.bias_correction!r}: "
                          f"expected true or false")
    if int(settings.parity_samples) < 1 or int(settings.latency.repeats) < 1:
        raise ConfigError("export.parity_samples and export.latency.repeats must be >= 1")
    return mode, gates


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export, quantize, gate and release (or reject) a model; see the module docstring."""
    out = run_dir(cfg)
    mode, settings = validate_export(cfg.export)
    recipe = load_recipe(cfg.data)
    gate_split = cfg.export.split
    staging = out / ".staging"
    with RunRecord("export", out, cfg) as record:
        model, meta, lineage = _load(cfg, record)
        check_fit(recipe, meta)
        if mode is Quantize.AUTO:
            from fmtransfer.models.families import family_of

            mode = Quantize(family_of(meta["backbone"]["name"]).int8)
        task, classes = meta["task"], meta.get("classes")
        dm = RecipeDataModule(recipe, batch_size=cfg.loader.batch_size, num_workers=cfg.loader.num_workers,
                              preprocess=Preprocess.from_dict(meta["preprocess"]), classes=classes, output_dir=out)
        table = dm.prepare()
        record.set_data(recipe.name, recipe.to_dict(), table.fingerprint)
        cal_rows = _calibration_rows(cfg, dm, gate_split) if mode is Quantize.STATIC else None

        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        parity_x = _collect(dm, gate_split, int(cfg.export.parity_samples))
        files = {"fp32": export_onnx(model, torch.from_numpy(parity_x[:2]), staging / FP32_FILE, task=task,
                                     opset=int(cfg.export.opset), exporter=cfg.export.exporter)}
        sessions = {"onnx_fp32": _session(files["fp32"])}
        with torch.inference_mode():
            reference = model(torch.from_numpy(parity_x)).float().numpy()
        gates = [parity_gate(reference, sessions["onnx_fp32"].run(parity_x), settings)]
        kept: list[str] = []
        bias_corrected = mode is Quantize.STATIC and bool(cfg.export.calibration.get("bias_correction", False))
        if mode is not Quantize.NONE:
            calibration = None
            kept = fp32_nodes(files["fp32"], list((cfg.export.get("keep_fp32") or {}).get(mode.value) or []))
            if cal_rows is not None:
                dm.use_rows(cfg.export.calibration.split, cal_rows)
                calibration = _collect(dm, cfg.export.calibration.split)
            files["int8"] = quantize_model(files["fp32"], staging / INT8_FILE, mode, input_name=INPUT_NAME,
                                           calibration=calibration, per_channel=bool(cfg.export.per_channel),
                                           method=cfg.export.calibration.get("method", "minmax"),
                                           keep_fp32=kept, bias_correction=bias_corrected)
            sessions["onnx_int8"] = _session(files["int8"])

        outputs, targets = _outputs(model, sessions, dm, gate_split)
        n_classes = len(classes) if classes else None
        accuracy = {k: _metric(task, v, targets, n_classes) for k, v in outputs.items()}
        if "onnx_int8" in outputs:
            if task == "classification":
                gates.append(agreement_gate(outputs["onnx_fp32"], outputs["onnx_int8"], settings))
            gates.append(accuracy_gate(accuracy["pytorch"], accuracy["onnx_int8"],
                                       "accuracy" if task == "classification" else "R^2", settings))
        latency = _latencies(model, sessions, parity_x, cfg)
        passed = all(g["passed"] for g in gates)

        lineage.update({"recipe_fingerprint": table.fingerprint, "gate_recipe": recipe.name,
                        "run_id": record.data["run_id"], "run_dir": str(out.resolve())})
        base_meta = {"format": ONNX_FORMAT, "format_version": 1, "task": task, "classes": classes,
                     "num_outputs": int(meta["num_outputs"]), "preprocess": meta["preprocess"],
                     "input_name": INPUT_NAME, "output_name": output_name(task), "input_layout": "NCHW",
                     "backbone": meta["backbone"]["name"], "exporter": cfg.export.exporter,
                     "opset": int(cfg.export.opset), "lineage": lineage, "gates": gates, "gates_passed": passed}
        for precision, path in files.items():
            onnx_meta = {**base_meta, "precision": precision,
                         "quantize": mode.value if precision == "int8" else "none"}
            if precision == "int8":
                onnx_meta["fp32_nodes"] = kept
                onnx_meta["bias_correction"] = bias_corrected
            embed_metadata(path, onnx_meta)
            write_json_atomic(sidecar_path(path), {**onnx_meta, "file": path.name, "bytes": path.stat().st_size,
                                                   "onnx_sha256": sha256_file(path)})

        sizes = {k: files[k].stat().st_size for k in files}
        variants = [("pytorch", "PyTorch eager fp32", None), ("onnx_fp32", "ONNX fp32", FP32_FILE),
                    ("onnx_int8", f"ONNX INT8 ({mode.value})", INT8_FILE)]
        rows = [{"variant": label, "file": f, "mb": sizes.get("fp32" if k == "onnx_fp32" else "int8", 0) / 1e6 if f
                 else None, "accuracy": accuracy[k], **latency[k]} for k, label, f in variants if k in accuracy]
        final_dir = out if passed else out / "rejected"
        final_dir.mkdir(exist_ok=True)
        released = {}
        for precision, path in files.items():
            for src in (path, sidecar_path(path)):
                src.replace(final_dir / src.name)
            released[precision] = final_dir / path.name
        shutil.rmtree(staging, ignore_errors=True)
        final = released.get("int8", released["fp32"])
        metrics = {"stage": "export", "task": task, "recipe": recipe.name, "split": gate_split,
                   "n_test": int(len(targets)), "quantize": mode.value, "exporter": cfg.export.exporter,
                   "fp32_nodes": kept, "bias_correction": bias_corrected,
                   "calibration_method": cfg.export.calibration.get("method", "minmax")
                   if mode is Quantize.STATIC else None,
                   "passed": passed, "gates": gates, "variants": rows, "sizes_bytes": sizes,
                   "int8_to_fp32_size": sizes["int8"] / sizes["fp32"] if "int8" in sizes else None,
                   "int8_fp32_agreement": agreement(outputs["onnx_fp32"], outputs["onnx_int8"])
                   if "onnx_int8" in outputs and task == "classification" else None,
                   # RMS difference of the INT8 outputs (logits) from ONNX fp32's: finer than top-1 agreement
                   "int8_fp32_rmse": float(np.sqrt(np.mean((outputs["onnx_int8"] - outputs["onnx_fp32"]) ** 2)))
                   if "onnx_int8" in outputs else None,
                   "lineage": lineage, "files": {k: str(v) for k, v in released.items()}}
        if passed and cfg.export.triton:
            name = cfg.export.name or _default_name(recipe.name, lineage)
            repo = write_repository(out / "triton", name, final, {**base_meta, "precision": "final"},
                                    int(cfg.export.triton_max_batch_size))
            metrics["triton"] = str(repo)
            for f in sorted(repo.rglob("*")):
                if f.is_file():
                    record.add_output(f, "triton")
        if not passed:
            write_json_atomic(final_dir / "reason.json", {"failed": [g for g in gates if not g["passed"]],
                                                          "gates": gates})
            record.add_output(final_dir / "reason.json", "rejection")
        write_json_atomic(out / "metrics.json", metrics)
        report = write_text_atomic(out / "export.md", _report(metrics, settings))
        for role, path in {"metrics": out / "metrics.json", "report": report, **dm.files}.items():
            record.add_output(path, role)
        for precision, path in released.items():
            record.add_output(path, f"onnx_{precision}" + ("" if passed else "_rejected"))
            record.add_output(sidecar_path(path), f"sidecar_{precision}")
        if not passed:
            failed = "; ".join(f"{g['name']} {g['value']:.4g} (limit {g['threshold']:g})" for g in gates
                               if not g["passed"])
            raise GateFailed(f"export rejected: {failed}. The files are in {final_dir} with reason.json")
    return {"run_dir": str(out), "model": str(final), "metrics": metrics, "report": str(report)}


def _session(path: Path) -> OnnxModel:
    """A staged file, before its metadata exists (so no metadata or sidecar checks)."""
    return OnnxModel(path, {"input_name": INPUT_NAME}, create_session(path))


def _default_name(recipe: str, lineage: dict[str, Any]) -> str:
    method = lineage.get("adapter_method") or "base"
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in f"{recipe}_{method}")


def _report(m: dict[str, Any], settings: GateSettings) -> str:
    metric = "accuracy" if m["task"] == "classification" else "R^2"
    lines = [f"# fmtransfer export: {'released' if m['passed'] else 'REJECTED'}", "",
             f"Scored on `{m['recipe']}` / {m['split']} ({m['n_test']} images); INT8 mode `{m['quantize']}`, "
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
    lines += ["", "Latency: median of repeated runs on this machine's CPU.", "",
              "| gate | value | limit | passed |", "|---|---:|---:|---|"]
    for g in m["gates"]:
        lines.append(f"| {g['name']} ({g['detail']}) | {g['value']:.4g} | {g['threshold']:g} | "
                     f"{'yes' if g['passed'] else '**no**'} |")
    return "\n".join(lines) + "\n"
