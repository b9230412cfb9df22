"""Run an exported ONNX model with onnxruntime: metadata, integrity checks, batched inference. No torch.

An exported model carries everything a server needs in its ONNX ``metadata_props`` (key ``fmtransfer``: a
JSON object with classes, preprocessing, task, input/output names, lineage and gate results, sealed with
``header_sha256``, the digest of its own canonical JSON) and the same in a sidecar ``<model>.onnx.json`` that also
records the ONNX file's sha256 and is sealed in turn (``sidecar_sha256``). The embedded metadata is checked
whether or not the sidecar is there (a Triton repository holds the file alone); the file's bytes are checked
when it is. A model its export's gates rejected is refused unless forced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.errors import ArtifactError
from fmtransfer.lineage.io import HEADER_DIGEST, header_sha256, sha256_file, verify_header

METADATA_KEY = "fmtransfer"
ONNX_FORMAT = "fmtransfer.onnx"
# 2: the metadata carries header_sha256 (version 1 metadata was not hashed and is refused)
ONNX_FORMAT_VERSION = 2
SIDECAR_SUFFIX = ".json"
SIDECAR_DIGEST = "sidecar_sha256"
# readable copies written beside the metadata for tools that only list keys; they must agree with it
READABLE_KEYS = ("task", "classes", "preprocess")


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
    def load(cls, path: str | Path, *, check_sidecar: bool = True, force: bool = False, threads: int | None = None,
             providers: list[str] | None = None) -> OnnxModel:
        """Open ``path``; refuses a file that is not ONNX, lacks fmtransfer metadata, whose metadata was edited,
        that disagrees with its sidecar, or that its export's gates rejected.

        Args:
            path: an .onnx file, or an export run dir (its ``model.onnx``).
            check_sidecar: check the file against ``<path>.json`` when that exists.
            force: load a rejected export anyway.

        Raises:
            ArtifactError: naming the file and what is wrong with it.
        """
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            reason = path.parent / "rejected" / "reason.json"
            hint = (f"; that export was rejected (see {reason}), its files are in {reason.parent}" if reason.is_file()
                    else " (pass model=<file.onnx> or an export run dir)")
            raise ArtifactError(f"model {path} does not exist{hint}")
        side = read_sidecar(path) if check_sidecar and sidecar_path(path).is_file() else None
        try:
            session = create_session(path, threads, providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a bad file
            raise ArtifactError(f"{path} is not a loadable ONNX model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from e
        meta = read_metadata(path, session.get_modelmeta().custom_metadata_map)
        if side is not None and side.get(HEADER_DIGEST) != meta[HEADER_DIGEST]:
            raise ArtifactError(f"{sidecar_path(path)} describes other metadata than {path} carries; one of them was "
                                f"replaced, refusing to load it")
        if not force:
            check_released(path, meta)
        return cls(path, meta, session)

    @property
    def input_name(self) -> str:
        return self.meta["input_name"]

    @property
    def classes(self) -> list[str] | None:
        return self.meta.get("classes")

    @property
    def output_names(self) -> list[str]:
        """The graph's outputs in order (the task's first; ``embedding`` second where the export added it)."""
        return [o.name for o in self.session.get_outputs()]

    def run_outputs(self, x: np.ndarray, names: list[str], batch_size: int = 256) -> list[np.ndarray]:
        """x: (N, C, H, W) float32, preprocessed -> one (N, k) float32 array per output in ``names``, computed in one
        pass per chunk of ``batch_size``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [self.session.run(names, {self.input_name: x[i:i + batch_size]}) for i in range(0, len(x), batch_size)]
        if not parts:
            return [np.zeros((0, 0), dtype=np.float32) for _ in names]
        return [np.concatenate([p[k] for p in parts]).astype(np.float32, copy=False) for k in range(len(names))]

    def run(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """x: (N, C, H, W) float32, preprocessed -> (N, num_outputs) float32, in chunks of ``batch_size``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        # only the task's output: an ``embedding`` output beside it is not computed for nothing
        names = [self.meta["output_name"]] if self.meta.get("output_name") else None
        parts = [self.session.run(names, {self.input_name: x[i:i + batch_size]})[0]
                 for i in range(0, len(x), batch_size)]
        if not parts:
            return np.zeros((0, int(self.meta["num_outputs"])), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)


def read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar of ``path``, checked: sealed, and recording the sha256 that ``path`` has.

    Raises:
        ArtifactError: unreadable, edited, or for other bytes than ``path`` holds.
    """
    side = sidecar_path(path)
    try:
        record = json.loads(side.read_text())
        recorded = record["onnx_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{side} is not a readable export sidecar ({type(e).__name__}: {e})") from e
    if record.get(SIDECAR_DIGEST) is None:
        raise ArtifactError(f"{side} has no {SIDECAR_DIGEST} (written before sidecars were hashed); re-export "
                            f"the model with `fmtransfer export`")
    if record[SIDECAR_DIGEST] != header_sha256(record, SIDECAR_DIGEST):
        raise ArtifactError(f"{side} does not match the {SIDECAR_DIGEST} it was written with; it was edited, "
                            f"refusing to load {path}")
    digest = sha256_file(path)
    if digest != recorded:
        raise ArtifactError(f"{path}: sha256 {digest[:12]}... differs from {recorded[:12]}... recorded in "
                            f"{side}; the model was changed or replaced, refusing to load it")
    return record


def read_metadata(path: Path, props: dict[str, str]) -> dict[str, Any]:
    """The ``fmtransfer`` metadata of ``path`` (``props``: its metadata_props), checked against its digest.

    Raises:
        ArtifactError: missing, not fmtransfer's, never hashed, edited, or its readable copies disagree with it.
    """
    raw = props.get(METADATA_KEY)
    if raw is None:
        raise ArtifactError(f"{path} has no {METADATA_KEY!r} metadata: export it with `fmtransfer export`")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ArtifactError(f"{path}: its {METADATA_KEY!r} metadata is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"{path}: metadata format {found!r}, expected {ONNX_FORMAT!r}")
    verify_header(meta, str(path), "classes, preprocessing, gates, ...", "re-export it with `fmtransfer export`")
    edited = [k for k in READABLE_KEYS if k in props and not _agrees(props[k], meta.get(k))]
    if edited:
        raise ArtifactError(f"{path}: its readable metadata {edited} disagrees with the hashed metadata; it was "
                            f"edited, refusing to load it")
    return meta


def readable_props(meta: dict[str, Any]) -> dict[str, str]:
    """The readable copies written beside the metadata (``READABLE_KEYS``)."""
    return {k: _readable(meta, k) for k in READABLE_KEYS}


def _readable(meta: dict[str, Any], key: str) -> str:
    value = meta.get(key)
    return value if isinstance(value, str) else json.dumps(value)


def _agrees(shown: str, value: Any) -> bool:
    if isinstance(value, str):
        return shown == value
    try:
        return json.loads(shown) == value
    except ValueError:
        return False


def check_released(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a model that its export's gates rejected (``gates_passed`` false, or a ``rejected/`` folder with its
    ``reason.json``).

    Raises:
        ArtifactError: naming the file, the failed gates and ``force``.
    """
    in_rejected = path.parent.name == "rejected" and (path.parent / "reason.json").is_file()
    if meta.get("gates_passed") is True and not in_rejected:
        return
    failed = [f"{g.get('name')} {g.get('value', float('nan')):.4g} (limit {g.get('threshold', float('nan')):g})"
              for g in meta.get("gates") or [] if isinstance(g, dict) and not g.get("passed")]
    raise ArtifactError(f"{path} was rejected by its export's gates ({'; '.join(failed) or 'not released'}); it is "
                        f"not a released model. Pass force=true (fmtransfer predict) or force=True "
                        f"(OnnxModel.load) to use it anyway")


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, K) -> (N, K) probabilities, computed stably."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
