"""A Triton-style model repository: ``<repo>/<name>/1/model.onnx``, ``<repo>/<name>/config.pbtxt`` and
``labels.txt`` for classifiers. Serving systems consume this layout without importing fmtransfer."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from fmtransfer.errors import ConfigError
from fmtransfer.lineage.io import atomic_path, write_text_atomic

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def config_pbtxt(name: str, meta: dict[str, Any], max_batch_size: int = 64) -> str:
    """The ``config.pbtxt`` of an ONNX Runtime model with a dynamic batch axis; every graph output is listed (the
    task's, then ``embedding`` where the export added it: Triton refuses a request for an unlisted output)."""
    channels, (h, w) = int(meta["preprocess"]["channels"]), meta["preprocess"]["image_size"]
    label = '\n    label_filename: "labels.txt"' if meta.get("classes") else ""
    outputs = [(meta["output_name"], int(meta["num_outputs"]), label)]
    embedding = meta.get("embedding")
    if embedding and embedding["name"] != meta["output_name"]:  # the second output (export.embedding_output)
        outputs.append((embedding["name"], int(embedding["dim"]), ""))
    listed = ",\n".join(f'  {{\n    name: "{o}"\n    data_type: TYPE_FP32\n    dims: [ {dim} ]{extra}\n  }}'
                        for o, dim, extra in outputs)
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            f'input [\n  {{\n    name: "{meta["input_name"]}"\n    data_type: TYPE_FP32\n'
            f'    dims: [ {channels}, {h}, {w} ]\n  }}\n]\n'
            f'output [\n{listed}\n]\n'
            f'dynamic_batching {{ }}\n')


def write_repository(repo: str | Path, name: str, onnx_file: str | Path, meta: dict[str, Any],
                     max_batch_size: int = 64) -> Path:
    """Copy ``onnx_file`` to ``<repo>/<name>/1/model.onnx`` and write its config (atomically, file by file).

    Returns:
        the model's folder ``<repo>/<name>``.
    """
    if not _NAME.match(name):
        raise ConfigError(f"export.name={name!r}: a Triton model name may use letters, digits, '_', '.', '-'")
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "1" / "model.onnx") as tmp:
        shutil.copyfile(onnx_file, tmp)
    if meta.get("classes"):
        write_text_atomic(folder / "labels.txt", "".join(f"{c}\n" for c in meta["classes"]))
    write_text_atomic(folder / "config.pbtxt", config_pbtxt(name, meta, max_batch_size))
    return folder
