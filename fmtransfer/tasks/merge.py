"""``merge``: fold an adapter into a plain model (``model.safetensors`` + ``model.json``) for export."""

from __future__ import annotations

from omegaconf import DictConfig

from fmtransfer.adapters.loading import allow_unfinished, load_model_or_adapted
from fmtransfer.lineage import RunRecord
from fmtransfer.models.classifier import save_model
from fmtransfer.tasks.common import record_sources, run_dir
from fmtransfer.tasks.result import StageResult


def merge(cfg: DictConfig) -> StageResult:
    """Fold ``adapter_file`` into its base; the result's outputs are ``model`` (model.json) and ``weights``."""
    out = run_dir(cfg)
    unfinished = allow_unfinished(cfg)
    with RunRecord("merge", out, cfg) as record:
        loaded = load_model_or_adapted(cfg.model, cfg.adapter_file, merge=True, allow_unfinished=unfinished)
        record_sources(record, loaded)
        model, meta, header = loaded.model, loaded.meta, loaded.adapter
        meta["lineage"] = {"run_id": record.data["run_id"], "run_dir": str(out.resolve()),
                           "base_sha256": header["base"]["sha256"], "adapter_sha256": header["weights_sha256"],
                           "recipe": header["lineage"].get("recipe")}
        meta.pop("weights_sha256", None)
        # the adapter's check against its base travels with the merged model: export refuses it as it would the
        # adapter (an adapter written before the check has none: refused there as unchecked)
        meta["do_no_harm"] = header.get("do_no_harm")
        weights, model_json = save_model(model, meta, out)
        record.add_output(weights, "weights")
        record.add_output(model_json, "model")
    return StageResult("merge", out, outputs={"model": model_json, "weights": weights})
