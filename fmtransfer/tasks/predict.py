"""``predict``: an exported ONNX model over a folder or CSV of images. Imports no torch (see
``fmtransfer.export.predict``), so it runs on a serving box with onnxruntime, numpy and PIL."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fmtransfer.config import require, run_dir
from fmtransfer.errors import ConfigError
from fmtransfer.export.predict import predict_files
from fmtransfer.lineage import RunRecord
from fmtransfer.tasks.result import StageResult


def output_path(output: str | Path, run: Path) -> Path:
    """Where the predictions go: a relative ``output`` is inside the run dir, an absolute one is honoured."""
    path = Path(output).expanduser()
    return path if path.is_absolute() else run / path


def predict(cfg: DictConfig) -> StageResult:
    """Write ``cfg.output`` (CSV; relative: in the run dir) with a prediction per readable image of
    ``cfg.input``."""
    require(cfg, "model", "input", "output", "batch_size", "force")
    if not isinstance(cfg.force, bool):
        raise ConfigError(f"force={cfg.force!r}: expected true or false")
    out = run_dir(cfg)
    with RunRecord("predict", out, cfg) as record:
        result = predict_files(cfg.model, cfg.input, output_path(cfg.output, out),
                               batch_size=int(cfg.batch_size), force=cfg.force)
        record.add_input(result["model"], "model")
        record.add_output(result["output"], "predictions")
        if result["skipped_file"]:
            record.add_output(result["skipped_file"], "skipped")
    outputs = {"model": result["model"], "output": result["output"], "skipped": result["skipped_file"]}
    return StageResult("predict", out, {"n": result["n"], "skipped": result["skipped"]},
                       {role: Path(path) for role, path in outputs.items() if path})
