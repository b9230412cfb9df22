"""``predict``: an exported ONNX model over a folder or CSV of images. Imports no torch (see
``fmtransfer.export.predict``), so it runs on a serving box with onnxruntime, numpy and PIL."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fmtransfer.config import require, run_dir
from fmtransfer.errors import ConfigError
from fmtransfer.export.device_monitor import DeviceMonitorSettings
from fmtransfer.export.predict import predict_files
from fmtransfer.export.scene import SceneSettings
from fmtransfer.lineage import RunRecord, write_json_atomic
from fmtransfer.tasks.result import StageResult


def output_path(output: str | Path, run: Path) -> Path:
    """Where the predictions go: a relative ``output`` is inside the run dir, an absolute one is honoured."""
    path = Path(output).expanduser()
    return path if path.is_absolute() else run / path


def scene_settings(cfg: DictConfig) -> SceneSettings | None:
    """``cfg.scene`` as settings when ``scene.enabled``, else None."""
    node = cfg.get("scene")
    if node is None:
        return None
    if not isinstance(node.get("enabled"), bool):
        raise ConfigError(f"scene.enabled={node.get('enabled')!r}: expected true or false")
    return SceneSettings.from_dict(OmegaConf.to_container(node, resolve=True)) if node.enabled else None


def monitor_settings(cfg: DictConfig) -> DeviceMonitorSettings | None:
    """``cfg.monitor`` as settings when ``monitor.enabled``, else None."""
    node = cfg.get("monitor")
    if node is None:
        return None
    if not isinstance(node.get("enabled"), bool):
        raise ConfigError(f"monitor.enabled={node.get('enabled')!r}: expected true or false")
    return DeviceMonitorSettings.from_dict(OmegaConf.to_container(node, resolve=True)) if node.enabled else None


def predict(cfg: DictConfig) -> StageResult:
    """Write ``cfg.output`` (CSV; relative: in the run dir) with a prediction per readable image of
    ``cfg.input``; with ``scene.enabled``, also ``metrics.json`` with the scene summary (fraction skipped, time
    saved, agreement under ``scene.verify``); with ``monitor.enabled``, OOD columns in the CSV and ``metrics.json``
    with the drift statistics (``fmtransfer.export.device_monitor``)."""
    require(cfg, "model", "input", "output", "batch_size", "force")
    if not isinstance(cfg.force, bool):
        raise ConfigError(f"force={cfg.force!r}: expected true or false")
    scene = scene_settings(cfg)
    monitor = monitor_settings(cfg)
    if scene is not None and monitor is not None:
        raise ConfigError("scene.enabled=true and monitor.enabled=true: a reused prediction has no embedding of its "
                          "own to score; run one of them")
    out = run_dir(cfg)
    with RunRecord("predict", out, cfg) as record:
        result = predict_files(cfg.model, cfg.input, output_path(cfg.output, out),
                               batch_size=int(cfg.batch_size), force=cfg.force, scene=scene, monitor=monitor)
        record.add_input(result["model"], "model")
        record.add_output(result["output"], "predictions")
        if result["skipped_file"]:
            record.add_output(result["skipped_file"], "skipped")
        metrics = {"n": result["n"], "skipped": result["skipped"]}
        metrics_file = None
        for key in ("scene", "monitor"):
            if key in result:
                metrics[key] = result[key]
        if "monitor" in result:
            record.add_input(result["monitor"]["reference"], "monitoring_reference")
        if "scene" in result or "monitor" in result:
            metrics_file = write_json_atomic(out / "metrics.json", metrics)
            record.add_output(metrics_file, "metrics")
    outputs = {"model": result["model"], "output": result["output"], "skipped": result["skipped_file"],
               "metrics": metrics_file}
    return StageResult("predict", out, metrics, {role: Path(path) for role, path in outputs.items() if path})
