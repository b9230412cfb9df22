"""PyTorch model -> ONNX (dynamic batch axis, named input and output), checked with ``onnx.checker``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fmtransfer.errors import ArtifactError
from fmtransfer.export.runtime import METADATA_KEY

Exporter = Literal["torchscript", "dynamo"]
INPUT_NAME = "input"


def output_name(task: str) -> str:
    return "logits" if task == "classification" else "prediction"


def export_onnx(model: nn.Module, sample: torch.Tensor, path: str | Path, *, task: str, opset: int = 17,
                exporter: Exporter = "torchscript") -> Path:
    """Export ``model`` (eval mode, CPU, fp32) for inputs shaped like ``sample`` (N, C, H, W), batch axis dynamic.

    ``torchscript`` is the TorchScript-based exporter (``dynamo=False``); ``dynamo`` goes through
    ``torch.export``. Both write one self-contained file. Value-info annotations are dropped from the graph:
    onnxruntime's quantizer re-infers shapes, and stale annotations from the dynamo exporter break it.
    """
    import onnx

    path = Path(path)
    model = model.eval().float().cpu()
    out = output_name(task)
    with torch.inference_mode(False), torch.no_grad(), _quiet():
        try:
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(model, (sample,), str(path), input_names=[INPUT_NAME], output_names=[out],
                                  dynamic_shapes=({0: batch},), opset_version=max(opset, 18), dynamo=True,
                                  external_data=False, verbose=False)
            elif exporter == "torchscript":
                torch.onnx.export(model, (sample,), str(path), input_names=[INPUT_NAME], output_names=[out],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, out: {0: "batch"}},
                                  opset_version=opset, dynamo=False)
            else:
                raise ArtifactError(f"export.exporter={exporter!r}: choose torchscript or dynamo")
        except ArtifactError:
            raise
        except Exception as e:  # noqa: BLE001 - the exporters raise many types; name the model and the cause
            raise ArtifactError(f"ONNX export ({exporter}) of {type(model).__name__} failed: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    proto = onnx.load(str(path))
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def embed_metadata(path: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` into the model's ``metadata_props`` (key ``fmtransfer``, plus readable copies of the
    classes, task and preprocessing for tools that only list keys). Rewrites ``path`` in place."""
    import onnx

    proto = onnx.load(str(path))
    props = {METADATA_KEY: json.dumps(meta, sort_keys=True), "task": meta["task"],
             "classes": json.dumps(meta.get("classes")), "preprocess": json.dumps(meta["preprocess"])}
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "fmtransfer"
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet():
    """The exporters print progress lines and tracer warnings that say nothing to a user."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)
