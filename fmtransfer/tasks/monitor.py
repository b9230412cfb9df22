"""``monitor``: compare a deployed model's view of new data with its reference, without labels.

    fmtransfer monitor model=<run, adapter or ONNX> reference=mnist_global/val current=uci_digits_region/test

Steps: settings -> the model (``model_outputs.open_model``) -> reference statistics (computed once per model and
reference data, stored beside the model as .npz + .json keyed by its sha256, reused) -> the current data's outputs
-> drift tests (over all current data, and over windows when ``monitor.window.order`` is set) -> the label-free
accuracy estimate (beside the true accuracy when the current data has labels) -> per-sample OOD scores and the
manifest of the most unusual samples -> ``monitor.json``, ``monitor.md``, plots.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fmtransfer.config import compose_stage, require, run_dir, to_plain
from fmtransfer.errors import ArtifactError, ConfigError, DataError
from fmtransfer.lineage import RunRecord, write_json_atomic, write_text_atomic
from fmtransfer.lineage.record import RUN_FILE
from fmtransfer.monitoring import calibration
from fmtransfer.monitoring.drift import (
    MIN_SAMPLES,
    NEEDS,
    DriftVerdict,
    check_test_settings,
    run_tests,
    windows,
)
from fmtransfer.monitoring.reference import ReferenceStats, build_reference, load_reference
from fmtransfer.tasks.model_outputs import ALL_ROWS, ModelOutputs, ModelRunner, open_model
from fmtransfer.tasks.monitor_data import DataRef, resolve_data
from fmtransfer.tasks.monitor_report import report_md, verdict_sentence, write_ood
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class MonitorSettings:
    """The ``monitor`` node, checked before any model or data is read."""

    alpha: float
    tests: tuple[str, ...]
    pca_components: int
    permutations: int
    ood_enabled: bool
    ood_k: int
    ood_scale_k: bool
    ood_bank: str
    ood_quantile: float
    manifest_size: int
    window_order: str | None
    window_size: int

    @classmethod
    def from_cfg(cls, node: DictConfig) -> MonitorSettings:
        m = to_plain(node)
        try:
            s = cls(float(m["alpha"]), tuple(m["tests"] or ()), int(m["pca_components"]), int(m["permutations"]),
                    bool(m["ood"]["enabled"]), int(m["ood"]["k"]), bool(m["ood"]["scale_k"]), str(m["ood"]["bank"]),
                    float(m["ood"]["quantile"]),
                    int(m["ood"]["manifest_size"]), m["window"]["order"], int(m["window"]["size"]))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"monitor: missing or malformed key {e}; see configs/monitor.yaml") from None
        s.check()
        return s

    def check(self) -> None:
        check_test_settings(self.alpha, self.tests, self.permutations)
        if not self.tests and not self.ood_enabled:
            raise ConfigError("monitor.tests is empty and monitor.ood.enabled=false: nothing to do")
        for key, value, low in (("pca_components", self.pca_components, 1), ("ood.k", self.ood_k, 1), ("ood.manifest_size", self.manifest_size, 0),
                                ("window.size", self.window_size, 2 * max(MIN_SAMPLES.values()))):
            if value < low:
                raise ConfigError(f"monitor.{key}={value} must be >= {low}")
        if self.ood_bank not in ("train", "reference"):
            raise ConfigError(f"monitor.ood.bank={self.ood_bank!r}: choose train or reference")
        if not 0.0 < self.ood_quantile < 1.0:
            raise ConfigError(f"monitor.ood.quantile={self.ood_quantile} must be between 0 and 1 (e.g. 0.95)")

    def reference_settings(self) -> dict[str, Any]:
        return {"pca_components": self.pca_components, "ood_k": self.ood_k, "ood_quantile": self.ood_quantile,
                "ood_scale_k": self.ood_scale_k, "ood_bank": self.ood_bank}


# --- reference statistics ---------------------------------------------------------------------------------------------
def cache_dir(cfg: DictConfig, runner: ModelRunner, out: Path) -> Path:
    """``reference_cache``, or ``monitoring/`` beside the model, or (not writable there) the run dir."""
    if cfg.reference_cache:
        return Path(cfg.reference_cache).expanduser()
    beside = Path(runner.identity["path"]).parent / "monitoring"
    probe = beside if beside.exists() else beside.parent
    if os.access(probe, os.W_OK):
        return beside
    log.warning("cannot write reference statistics beside the model (%s); keeping them in this run dir", beside)
    return out / "reference"


def _stats_name(ref: DataRef, runner: ModelRunner) -> str:
    return f"reference_{ref.recipe['name']}_{ref.split}_{runner.identity['sha256'][:12]}"


def reference_stats(cfg: DictConfig, ref: DataRef, runner: ModelRunner, settings: MonitorSettings,
                    out: Path) -> tuple[ReferenceStats, str]:
    """Stored statistics when they match this model, data and settings; else computed and stored.

    Returns:
        (statistics, how: "loaded" | "reused" | "computed").

    Raises:
        ArtifactError: stored statistics (``reference=<.json>``) of another model (sha256 or embedding dimension).
    """
    sha = runner.identity["sha256"]
    if ref.stats is not None:
        stats = load_reference(ref.stats)
        if stats.identity.get("sha256") != sha or stats.identity.get("embedding_dim") not in (
                None, runner.identity["embedding_dim"]):
            raise ArtifactError(
                f"reference={ref.stats} was computed with model {stats.identity.get('path')} (sha256 "
                f"{str(stats.identity.get('sha256'))[:12]}..., backbone {stats.identity.get('backbone')}, embedding "
                f"dimension {stats.identity.get('embedding_dim')}), but model={cfg.model} is sha256 {sha[:12]}... "
                f"(backbone {runner.identity['backbone']}, dimension {runner.identity['embedding_dim']}); compare a "
                f"model only with its own reference: pass reference=<recipe>[/<split>] to compute it for this model")
        return stats, "loaded"
    folder = cache_dir(cfg, runner, out)
    stored = folder / f"{_stats_name(ref, runner)}.json"
    fingerprint = _fingerprint(ref, runner)
    if stored.is_file():
        try:
            stats = load_reference(stored)
            differ = stats.matches(sha, fingerprint, settings.reference_settings())
        except ArtifactError as e:
            differ = [str(e)]
        if not differ:
            log.info("reference statistics reused: %s", stored)
            return stats, "reused"
        log.info("reference statistics in %s do not fit (%s); recomputing", stored, "; ".join(differ))
    outputs = runner.outputs(ref.recipe, ref.split, batch_size=int(cfg.loader.batch_size),
                             accelerator=cfg.accelerator, num_workers=cfg.loader.num_workers)
    _check_outputs(outputs, f"reference={ref.text}")
    data = {"recipe": ref.recipe["name"], "split": ref.split, "fingerprint": fingerprint, "n": len(outputs)}
    bank = _ood_bank(cfg, ref, runner, settings, outputs)
    data["ood_bank"] = "reference" if bank is None else f"{ref.recipe['name']}/train ({len(bank)})"
    stats = build_reference(runner.identity, data, settings.reference_settings(), outputs.probs, outputs.embeddings,
                            outputs.targets, bank)
    try:
        stats.save(folder, _stats_name(ref, runner))
    except OSError as e:
        log.warning("reference statistics not stored in %s (%s); storing them in this run dir", folder, e)
        stats.save(out / "reference", _stats_name(ref, runner))
    log.info("reference statistics computed on %s (%d samples): %s", ref.label, len(outputs), stats.files["json"])
    return stats, "computed"


def default_settings() -> MonitorSettings:
    """``monitor``'s settings as configs/monitor.yaml holds them (what ``export`` stores reference statistics with,
    so that a later ``fmtransfer monitor`` with its defaults reuses them)."""
    return MonitorSettings.from_cfg(compose_stage("monitor", []).monitor)


def store_reference(runner: ModelRunner, recipe: dict[str, Any], split: str, folder: Path, *,
                    settings: MonitorSettings, batch_size: int, max_bank: int, seed: int) -> ReferenceStats:
    """Compute reference statistics of ``runner`` on ``split`` of ``recipe`` and store them in ``folder`` under the
    name ``monitor`` looks up (``reference_<recipe>_<split>_<sha12>``), for a model deployed without its data.

    The OOD bank is the recipe's train split (``settings.ood_bank=train``), at most ``max_bank`` embeddings (a
    sample seeded by ``seed``, kept in table order): the bank is most of the file's size.
    """
    ref = DataRef(f"{recipe['name']}/{split}", recipe, split)
    outputs = runner.outputs(recipe, split, batch_size=batch_size, accelerator="cpu", num_workers=0)
    _check_outputs(outputs, f"reference {ref.text}")
    bank = None
    if settings.ood_bank == "train" and outputs.embeddings is not None and split not in ("train", ALL_ROWS):
        train = runner.outputs(recipe, "train", batch_size=batch_size, accelerator="cpu", num_workers=0)
        _check_outputs(train, f"reference {recipe['name']}/train (the OOD bank)")
        bank = train.embeddings
        if len(bank) > max_bank:
            bank = bank[np.sort(np.random.default_rng(seed).choice(len(bank), max_bank, replace=False))]
    data = {"recipe": recipe["name"], "split": split, "fingerprint": f"{outputs.fingerprint}:{split}",
            "n": len(outputs),
            "ood_bank": "reference" if bank is None else f"{recipe['name']}/train ({len(bank)})"}
    stats = build_reference(runner.identity, data, settings.reference_settings(), outputs.probs, outputs.embeddings,
                            outputs.targets, bank)
    stats.save(folder, _stats_name(ref, runner))
    return stats


def _ood_bank(cfg: DictConfig, ref: DataRef, runner: ModelRunner, settings: MonitorSettings,
              outputs: ModelOutputs) -> np.ndarray | None:
    """The train split's embeddings (``monitor.ood.bank=train``), or None: the reference's own."""
    if settings.ood_bank != "train" or not settings.ood_enabled or outputs.embeddings is None or ref.split in (
            "train", ALL_ROWS):
        return None
    try:
        train = runner.outputs(ref.recipe, "train", batch_size=int(cfg.loader.batch_size),
                               accelerator=cfg.accelerator, num_workers=cfg.loader.num_workers)
    except DataError as e:
        log.info("OOD bank: the reference's own embeddings (%s)", e)
        return None
    _check_outputs(train, f"reference={ref.recipe['name']}/train (the OOD bank)")
    return train.embeddings


def _fingerprint(ref: DataRef, runner: ModelRunner) -> str:
    from fmtransfer.data import load_recipe
    from fmtransfer.data.table import build_table

    table = build_table(load_recipe(ref.recipe), classes=runner.identity["classes"])
    return f"{table.fingerprint}:{ref.split}"


def _check_outputs(outputs: ModelOutputs, what: str) -> None:
    for name in ("probs", "embeddings"):
        array = getattr(outputs, name)
        if array is not None and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).any(axis=1).sum())
            raise DataError(f"{what}: the model's {name} are NaN or infinite for {bad} of {len(array)} samples; "
                            f"the model or its inputs are broken")


# --- the comparison ---------------------------------------------------------------------------------------------------
def _sides(stats: ReferenceStats, outputs: ModelOutputs, rows: np.ndarray | None = None):
    take = (lambda a: a) if rows is None else (lambda a: None if a is None else a[rows])
    reference = {"probs": stats.probs, "embeddings": stats.compared_embeddings}
    current = {"probs": take(outputs.probs), "embeddings": take(outputs.embeddings)}
    return reference, current


def compare(stats: ReferenceStats, outputs: ModelOutputs, settings: MonitorSettings, seed: int,
            rows: np.ndarray | None = None, strict: bool = True) -> dict[str, DriftVerdict]:
    """Every configured test on the current outputs (``rows`` of them). ``strict``: too few samples is an error;
    otherwise (a window) the test is skipped with the reason."""
    reference, current = _sides(stats, outputs, rows)
    verdicts: dict[str, DriftVerdict] = {}
    for test in settings.tests:
        try:
            verdicts.update(run_tests(reference, current, tests=(test,), alpha=settings.alpha, pca=stats.pca,
                                      components=settings.pca_components, permutations=settings.permutations,
                                      seed=seed))
        except DataError as e:
            if strict:
                raise
            n_cur = len(rows) if rows is not None else len(outputs)
            verdicts[test] = DriftVerdict.skip(test, str(e), settings.alpha, 0, n_cur)
    return verdicts


def order_values(settings: MonitorSettings, cur: DataRef, outputs: ModelOutputs) -> np.ndarray | None:
    """The order of each current sample (``monitor.window.order``), or None for no windows."""
    column = settings.window_order
    if column is None:
        return None
    if column == "row":
        return np.arange(len(outputs))
    if cur.csv is None:
        raise ConfigError(f"monitor.window.order={column!r} names a CSV column, but current={cur.text} is not a CSV "
                          f"(use monitor.window.order=row for the data's own order)")
    with open(cur.csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise ConfigError(f"monitor.window.order={column!r}: {cur.csv} has no such column; it has "
                              f"{reader.fieldnames}")
        path_col = (cur.recipe["source"].get("columns") or {}).get("path", "path")
        by_id = {(r.get(path_col) or "").strip(): (r.get(column) or "").strip() for r in reader}
    raw = [by_id.get(str(i), "") for i in outputs.ids]
    empty = [str(i) for i, v in zip(outputs.ids, raw, strict=True) if v == ""]
    if empty:
        raise DataError(f"{cur.csv}: column {column!r} is empty for {len(empty)} samples, e.g. {empty[:3]}")
    return _sortable(raw, column)


def _sortable(raw: list[str], column: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in raw])
    except ValueError:
        pass
    try:
        return np.array([datetime.fromisoformat(v).timestamp() for v in raw])
    except ValueError:
        raise DataError(f"order column {column!r} holds values that are neither numbers nor ISO dates/times, e.g. "
                        f"{raw[0]!r}") from None


def window_results(stats: ReferenceStats, outputs: ModelOutputs, order: np.ndarray, settings: MonitorSettings,
                   seed: int, ood_scores: np.ndarray | None) -> list[dict[str, Any]]:
    results = []
    for i, pos in enumerate(windows(order, settings.window_size)):
        verdicts = compare(stats, outputs, settings, seed + i, pos, strict=False)
        entry = {"window": i, "n": int(len(pos)), "first": float(order[pos].min()), "last": float(order[pos].max()),
                 "tests": {k: v.to_dict() for k, v in verdicts.items()}}
        if stats.temperature is not None and outputs.probs is not None:
            entry["estimated_accuracy"] = calibration.estimated_accuracy(outputs.probs[pos], stats.temperature)
        if outputs.targets is not None and outputs.probs is not None:
            entry["accuracy"] = float((outputs.probs[pos].argmax(1) == outputs.targets[pos]).mean())
        if ood_scores is not None:
            entry["ood_share"] = float((ood_scores[pos] > stats.ood.threshold).mean())
        results.append(entry)
    return results


def accuracy_estimate(stats: ReferenceStats, outputs: ModelOutputs) -> dict[str, Any]:
    if outputs.probs is None:
        return {"skipped": "the model gives no class probabilities (a head-less or regression model)"}
    if outputs.label_note:
        return {"skipped": "the current data's classes are not the model's, so its accuracy on them is not defined "
                           "(a new crop: fit an adapter; the drift tests and OOD scores still apply)"}
    if stats.temperature is None:
        return {"skipped": "the reference has no labels to fit the temperature on (use a labelled split, e.g. "
                           "reference=<recipe>/val)"}
    return {"temperature": stats.temperature,
            "estimated": calibration.estimated_accuracy(outputs.probs, stats.temperature),
            "uncalibrated_confidence": calibration.estimated_accuracy(outputs.probs, 1.0),
            "true": outputs.accuracy, "error": (None if outputs.accuracy is None else
                                                calibration.estimated_accuracy(outputs.probs, stats.temperature)
                                                - outputs.accuracy)}


# --- the stage ---------------------------------------------------------------------------------------------------------
def _record_model(record: RunRecord, runner: ModelRunner) -> None:
    from fmtransfer.tasks.common import record_sources

    if runner.identity["kind"] in ("torch", "adapter"):
        record_sources(record, runner.loaded)
        return
    path = Path(runner.identity["path"])
    record.add_input(path, "model")
    if (path.parent / RUN_FILE).is_file():
        record.add_parent(path.parent)


def monitor(cfg: DictConfig) -> StageResult:
    """Compare ``cfg.current`` with ``cfg.reference`` through ``cfg.model``; see the module docstring."""
    require(cfg, "model", "adapter_base", "allow_unfinished", "force", "reference", "current", "current_limit",
            "reference_cache", "accelerator", "loader", "monitor", "seed")
    out = run_dir(cfg)
    settings = MonitorSettings.from_cfg(cfg.monitor)
    if not isinstance(cfg.allow_unfinished, bool) or not isinstance(cfg.force, bool):
        raise ConfigError("allow_unfinished and force take true or false")
    with RunRecord("monitor", out, cfg) as record:
        runner = open_model(cfg.model, adapter_base=cfg.adapter_base, allow_unfinished=cfg.allow_unfinished,
                            force=cfg.force)
        _record_model(record, runner)
        skipped = _embedding_skips(runner, settings)
        ref = resolve_data(cfg.reference, "reference", "val", runner)
        cur = resolve_data(cfg.current, "current", "test", runner)
        stats, how = reference_stats(cfg, ref, runner, settings, out)
        record.add_input(stats.files["json"], "reference_statistics")
        outputs = runner.outputs(cur.recipe, cur.split, batch_size=int(cfg.loader.batch_size),
                                 accelerator=cfg.accelerator, limit=cfg.current_limit,
                                 num_workers=cfg.loader.num_workers)
        _check_outputs(outputs, f"current={cur.text}")
        if outputs.label_note:
            log.warning("current=%s: %s", cur.text, outputs.label_note)
        if ref.recipe is not None:
            record.set_data(ref.recipe["name"], ref.recipe, stats.data["fingerprint"], role="reference")
        record.set_data(cur.recipe["name"], cur.recipe, outputs.fingerprint, role="current")
        order = order_values(settings, cur, outputs)
        verdicts = compare(stats, outputs, settings, int(cfg.seed))
        for test, reason in skipped.items():
            verdicts[test] = DriftVerdict.skip(test, reason, settings.alpha, 0, len(outputs))
        files: dict[str, Path] = {}
        ood = _ood(out, stats, outputs, settings, files)
        scores = ood.pop("_scores", None)
        win = window_results(stats, outputs, order, settings, int(cfg.seed), scores) if order is not None else None
        if win:
            files["windows"] = _windows_plot(out, win, settings)
        metrics = {"stage": "monitor", "model": runner.identity,
                   "reference": {"label": ref.label, "statistics": how, "file": stats.files["json"],
                                 "n": len(stats.probs if stats.probs is not None else stats.embeddings),
                                 "data": stats.data},
                   "current": {"label": cur.label, "n": len(outputs), "labelled": outputs.targets is not None,
                               "labels_not_used": outputs.label_note,
                               "inference_seconds": outputs.seconds,
                               "samples_per_s": len(outputs) / outputs.seconds if outputs.seconds > 0 else None},
                   "settings": {"alpha": settings.alpha, "tests": list(settings.tests),
                                "pca_components": settings.pca_components, "permutations": settings.permutations,
                                "window_order": settings.window_order, "window_size": settings.window_size},
                   "summary": verdict_sentence(verdicts), "drift": any(v.detected for v in verdicts.values()),
                   "tests": {k: v.to_dict() for k, v in verdicts.items()},
                   "accuracy": accuracy_estimate(stats, outputs), "ood": ood, "windows": win}
        write_json_atomic(out / "monitor.json", metrics)
        files["metrics"] = out / "monitor.json"
        files["report"] = write_text_atomic(out / "monitor.md", report_md(metrics))
        for role, path in files.items():
            record.add_output(path, role)
    log.info("monitor: %s", metrics["summary"])
    return StageResult("monitor", out, metrics, files, [("Monitoring", report_md(metrics).split("\n", 2)[2])])


def _embedding_skips(runner: ModelRunner, settings: MonitorSettings) -> dict[str, str]:
    """The embedding tests the model cannot feed (an ONNX export without an embedding output): skipped with the
    reason; an error when nothing else is left to run."""
    if runner.gives_embeddings:
        return {}
    reason = (f"model {runner.identity['path']} gives no embeddings (an ONNX export without an 'embedding' output); "
              f"monitor the PyTorch model, or an export with that output, for this test")
    wanted = [t for t in settings.tests if NEEDS[t] == "embeddings"] + (["ood"] if settings.ood_enabled else [])
    left = [t for t in settings.tests if NEEDS[t] == "probs" and runner.identity["classes"]]
    if wanted and not left:
        raise ConfigError(f"monitor.tests={list(settings.tests)} with ood.enabled={settings.ood_enabled}: every one "
                          f"needs embeddings, and {reason}")
    if wanted:
        log.warning("skipped %s: %s", ", ".join(wanted), reason)
    return {t: reason for t in wanted if t != "ood"}


def _ood(out: Path, stats: ReferenceStats, outputs: ModelOutputs, settings: MonitorSettings,
         files: dict[str, Path]) -> dict[str, Any]:
    if not settings.ood_enabled:
        return {"skipped": "monitor.ood.enabled=false"}
    if stats.ood is None or outputs.embeddings is None:
        return {"skipped": "the model gives no embeddings (an ONNX export without an 'embedding' output)"}
    from fmtransfer.plots import ood_histogram_png

    scores = stats.ood.score(outputs.embeddings)
    files.update(write_ood(out, outputs, scores, stats.ood.threshold, settings.manifest_size))
    files["ood_plot"] = ood_histogram_png(stats.ood.reference_scores, scores, stats.ood.threshold,
                                          out / "ood_scores.png", "OOD score: reference (leave-one-out) vs current")
    flagged = int((scores > stats.ood.threshold).sum())
    return {"k": stats.ood.k, "bank": stats.data.get("ood_bank", "reference"), "quantile": stats.ood.quantile, "threshold": stats.ood.threshold, "flagged": flagged,
            "share": flagged / len(scores), "median_score": float(np.median(scores)),
            "reference_median_score": float(np.median(stats.ood.reference_scores)),
            "manifest_n": int(min(settings.manifest_size, len(scores))), "_scores": scores}


def _windows_plot(out: Path, win: list[dict[str, Any]], settings: MonitorSettings) -> Path:
    from fmtransfer.plots import windows_png

    labels = [f"{w['first']:g}" for w in win]
    p_values = {t: [w["tests"][t]["p_value"] for w in win] for t in win[0]["tests"]}
    extra = {k: [w.get(k) for w in win] for k in ("estimated_accuracy", "accuracy", "ood_share")
             if any(k in w for w in win)}
    return windows_png(labels, p_values, settings.alpha, out / "windows.png", "drift tests per window", extra)
