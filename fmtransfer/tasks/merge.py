"""``merge``: fold an adapter into a plain model (``model.safetensors`` + ``model.json``) for export."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fmtransfer.adapters.artifact import AdapterHost, read_adapter
from fmtransfer.lineage import RunRecord
from fmtransfer.models.classifier import load_model, resolve_model_path, save_model
from fmtransfer.tasks.common import run_dir
from fmtransfer.tasks.evaluate import record_sources
from fmtransfer.tasks.result import StageResult


def load_adapted(adapter: str | Path, model: str | Path | None = None):
    """Base + adapter, ready to predict. Returns (host, adapted meta, base path, adapter header)."""
    header, state = read_adapter(adapter)
    base_path = resolve_model_path(model or header["base"]["path"])
    base, base_meta = load_model(base_path)
    host = AdapterHost(base, base_meta)
    meta = host.apply(header, state)
    return host, meta, base_path, header


def merge(cfg: DictConfig) -> StageResult:
    """Fold ``adapter_file`` into its base; the result's outputs are ``model`` (model.json) and ``weights``."""
    out = run_dir(cfg)
    with RunRecord("merge", out, cfg) as record:
        host, _, base_path, header = load_adapted(cfg.adapter_file, cfg.model)
        record_sources(record, base_path, host.base_meta, header)
        model, meta = host.merge()
        meta["lineage"] = {"run_id": record.data["run_id"], "run_dir": str(out.resolve()),
                           "base_sha256": header["base"]["sha256"], "adapter_sha256": header["weights_sha256"],
                           "recipe": header["lineage"].get("recipe")}
        meta.pop("weights_sha256", None)
        weights, model_json = save_model(model, meta, out)
        record.add_output(weights, "weights")
        record.add_output(model_json, "model")
    return StageResult("merge", out, outputs={"model": model_json, "weights": weights})
