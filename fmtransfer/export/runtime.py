"""Run an exported ONNX model with onnxruntime: metadata, integrity checks, batched inference. No torch.

An exported model carries everything a server needs in its ONNX ``metadata_props`` (key ``fmtransfer``: a
JSON object with classes, preprocessing, task, input/output names, lineage and gate results) and the same in a
sidecar ``<model>.onnx.json`` that also records the ONNX file's sha256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.errors import ArtifactError
from fmtransfer.lineage.io import sha256_file

METADATA_KEY = "fmtransfer"
ONNX_FORMAT = "fmtransfer.onnx"
SIDECAR_SUFFIX = ".json"


def sidecar_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    path = Path(model_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def session_options(threads: int | None = None, optimize: bool = True):
    """``optimize=False`` runs the graph as written (a QDQ model is then simulated in fp32, node by node)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        opts.intra_op_num_threads = int(threads)
    return opts


def create_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    """An onnxruntime InferenceSession with full graph optimisation (CPU unless ``providers`` says otherwise)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(threads),
                                providers=providers or ["CPUExecutionProvider"])


@dataclass
class OnnxModel:
    """An onnxruntime session over an exported model, with its fmtransfer metadata.

    Attributes:
        path: the .onnx file.
        meta: the embedded ``fmtransfer`` metadata (classes, preprocess, task, input/output names, lineage).
        session: the onnxruntime InferenceSession (CPU unless ``providers`` says otherwise).
    """

    path: Path
    meta: dict[str, Any]
    session: Any

    @classmethod
    def load(cls, path: str | Path, *, check_sidecar: bool = True, threads: int | None = None,
             providers: list[str] | None = None) -> OnnxModel:
        """Open ``path``; refuses a file that is not ONNX, lacks fmtransfer metadata, or disagrees with its sidecar.

        Raises:
            ArtifactError: naming the file and what is wrong with it.
        """

        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise ArtifactError(f"model {path} does not exist (pass model=<file.onnx> or an export run dir)")
        side = sidecar_path(path)
        if check_sidecar and side.is_file():
            try:
                recorded = json.loads(side.read_text())["onnx_sha256"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ArtifactError(f"{side} is not a readable export sidecar ({e})") from e
            digest = sha256_file(path)
            if digest != recorded:
                raise ArtifactError(f"{path}: sha256 {digest[:12]}... differs from {recorded[:12]}... recorded in "
                                    f"{side}; the model was changed or replaced, refusing to load it")
        try:
            session = create_session(path, threads, providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a bad file
            raise ArtifactError(f"{path} is not a loadable ONNX model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from e
        raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise ArtifactError(f"{path} has no {METADATA_KEY!r} metadata: export it with `fmtransfer export`")
        meta = json.loads(raw)
        if meta.get("format") != ONNX_FORMAT:
            raise ArtifactError(f"{path}: metadata format {meta.get('format')!r}, expected {ONNX_FORMAT!r}")
        return cls(path, meta, session)

    @property
    def input_name(self) -> str:
        return self.meta["input_name"]

    @property
    def classes(self) -> list[str] | None:
        return self.meta.get("classes")

    def run(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """x: (N, C, H, W) float32, preprocessed -> (N, num_outputs) float32, in chunks of ``batch_size``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [self.session.run(None, {self.input_name: x[i:i + batch_size]})[0]
                 for i in range(0, len(x), batch_size)]
        if not parts:
            return np.zeros((0, int(self.meta["num_outputs"])), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, K) -> (N, K) probabilities, computed stably."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
