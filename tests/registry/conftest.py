"""Registry fixtures: a registry file of the test's own, and small real export runs (an ONNX file with its sealed
metadata and sidecar, written under a RunRecord so the stages' hook registers it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fmtransfer.export.runtime import (
    METADATA_KEY,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    SIDECAR_DIGEST,
    readable_props,
    sidecar_path,
)
from fmtransfer.lineage import RunRecord, sha256_file, write_json_atomic
from fmtransfer.lineage.io import seal_header
from fmtransfer.lineage.registry import ENV

CLASSES = ["a", "b", "c"]


@pytest.fixture
def registry_path(tmp_path, monkeypatch) -> Path:
    """The registry every stage and command of the test uses: ``$FMTRANSFER_REGISTRY`` in the test's tmp dir."""
    path = tmp_path / "registry" / "registry.sqlite"
    monkeypatch.setenv(ENV, str(path))
    return path


def tiny_onnx(path: Path, seed: int) -> Path:
    """A loadable classifier graph: (N, 1, 4, 4) -> flatten -> (N, 3) logits; ``seed`` sets its weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(16, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def seal_export(path: Path, gates_passed: bool = True, do_no_harm: dict | None = None) -> dict:
    """Embed fmtransfer's sealed metadata and write the sealed sidecar, as ``fmtransfer export`` does."""
    import onnx

    gates = [{"name": "max_abs_diff", "value": 1e-6 if gates_passed else 0.5, "threshold": 1e-3,
              "passed": gates_passed}]
    meta = seal_header({"format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "task": "classification",
                        "classes": CLASSES, "num_outputs": 3, "input_name": "input", "output_name": "logits",
                        "output_names": ["logits"], "input_layout": "NCHW",
                        "preprocess": {"image_size": [4, 4], "channels": 1, "mean": [0.5], "std": [0.5]},
                        "gates": gates, "gates_passed": gates_passed,
                        **({"do_no_harm": do_no_harm} if do_no_harm is not None else {})})
    proto = onnx.load(str(path))
    for key, value in {METADATA_KEY: json.dumps(meta, sort_keys=True), **readable_props(meta)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    write_json_atomic(sidecar_path(path), seal_header(
        {**meta, "file": path.name, "bytes": path.stat().st_size, "onnx_sha256": sha256_file(path)}, SIDECAR_DIGEST))
    return meta


def export_run(run_dir: Path, region: str, seed: int = 0, gates_passed: bool = True,
               do_no_harm: dict | None = None, inputs: dict[str, Path] | None = None) -> Path:
    """An export run dir with a released (or rejected) ONNX for ``region``; returns the ONNX file."""
    onnx_file = tiny_onnx(run_dir / "model.onnx", seed)
    seal_export(onnx_file, gates_passed, do_no_harm)
    write_json_atomic(run_dir / "metrics.json", {"stage": "export", "passed": gates_passed})
    with RunRecord("export", run_dir) as record:
        for role, path in (inputs or {}).items():
            record.add_input(path, role)
        record.set_data(f"{region}_recipe", {"name": f"{region}_recipe", "region": region}, f"{seed:064x}")
        record.add_output(run_dir / "metrics.json", "metrics")
        record.add_output(onnx_file, "onnx_fp32")
        record.add_output(sidecar_path(onnx_file), "sidecar_fp32")
    return onnx_file


def shadow_run(run_dir: Path, candidate: Path, production: Path, recommendation: str) -> Path:
    """A shadow run's record over two ONNX files, with its verdict in shadow.json."""
    with RunRecord("shadow", run_dir) as record:
        record.add_input(production, "production")
        record.add_input(candidate, "candidate")
        write_json_atomic(run_dir / "shadow.json", {"recommendation": recommendation, "reasons": ["test"]})
        record.add_output(run_dir / "shadow.json", "metrics")
    return run_dir / "shadow.json"
