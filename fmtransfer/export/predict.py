"""Predict with an exported ONNX model, using only onnxruntime, numpy and PIL (no torch, no Lightning).

    fmtransfer predict model=outputs/export/<run>/model.int8.onnx input=<folder or csv> output=preds.csv

Preprocessing comes from the model's embedded metadata: each image is read (PNG, JPEG, TIFF, ...), converted
to the model's channel count, resized to its input size (bilinear, as in training) and normalised. Unreadable
images and images whose channels cannot be converted are skipped and listed next to the output.
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fmtransfer.data.images import ChannelMismatch, UnreadableImage, read_image
from fmtransfer.errors import DataError
from fmtransfer.export.runtime import OnnxModel, softmax
from fmtransfer.lineage.io import write_text_atomic

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def list_inputs(source: str | Path) -> list[Path]:
    """A folder (searched recursively for images, sorted) or a CSV with a ``path`` column (relative paths are
    read from the CSV's folder).

    Raises:
        DataError: missing folder or CSV, no ``path`` column, or no images at all.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise DataError(f"input folder {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise DataError(f"input CSV {source} needs a 'path' column; it has {reader.fieldnames}")
            paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else source.parent / r["path"]
                     for r in reader if r["path"]]
        if not paths:
            raise DataError(f"input CSV {source} lists no images")
        return paths
    raise DataError(f"input {source} is neither a folder nor a .csv file")


def resize_bilinear(hwc: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float32 -> (size[0], size[1], C), bilinear with antialiasing (PIL; torch's
    ``interpolate(mode="bilinear", antialias=True)`` used in training follows the same filter)."""
    if hwc.shape[:2] == tuple(size):
        return hwc
    h, w = size
    return np.stack([np.asarray(Image.fromarray(hwc[:, :, c], mode="F").resize((w, h), Image.BILINEAR))
                     for c in range(hwc.shape[2])], axis=-1)


def preprocess_image(path: str | Path, pre: dict[str, Any]) -> np.ndarray:
    """One image file -> (C, H, W) float32 as the model expects (``pre``: the metadata's preprocess dict).

    Raises:
        UnreadableImage, ChannelMismatch.
    """
    arr = read_image(path, int(pre["channels"]))  # decoded exactly as training decodes
    arr = resize_bilinear(np.ascontiguousarray(arr, dtype=np.float32), tuple(pre["image_size"]))
    mean = np.asarray(pre["mean"], dtype=np.float32)
    std = np.asarray(pre["std"], dtype=np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1).astype(np.float32, copy=False)


def _batches(paths: list[Path], pre: dict[str, Any], batch_size: int,
             skipped: list[tuple[str, str]]) -> Iterator[tuple[list[Path], np.ndarray]]:
    done: list[Path] = []
    arrays: list[np.ndarray] = []
    for path in paths:
        try:
            arrays.append(preprocess_image(path, pre))
            done.append(path)
        except UnreadableImage as e:
            skipped.append((str(path), str(e)))
        except ChannelMismatch as e:
            skipped.append((str(path), f"channels: {e}"))
        if len(arrays) == batch_size:
            yield done, np.stack(arrays)
            done, arrays = [], []
    if arrays:
        yield done, np.stack(arrays)


def predict_files(model: str | Path, source: str | Path, output: str | Path, *, batch_size: int = 64,
                  progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Predict every image of ``source`` and write ``output`` (CSV) atomically.

    Classification rows: ``path, prediction, confidence, p_<class>...``; regression: ``path, prediction``.
    Skipped images go to ``<output stem>.skipped.csv`` (path, reason) and a warning. ``force``: serve a model its
    export's gates rejected (refused otherwise).

    Returns:
        ``{"output", "n", "skipped", "skipped_file"}``.
    """
    onnx_model = OnnxModel.load(model, force=force)
    meta = onnx_model.meta
    if meta["task"] == "embedding":
        raise DataError(f"model {model} is a head-less backbone: it outputs embeddings, not predictions; give it a "
                        f"head with fmtransfer adapt and export that")
    paths = list_inputs(source)
    skipped: list[tuple[str, str]] = []
    output = Path(output)
    buf = io.StringIO()
    w = csv.writer(buf)
    classes = meta.get("classes")
    classification = meta["task"] == "classification"
    w.writerow(["path", "prediction", "confidence", *[f"p_{c}" for c in classes]] if classification
               else ["path", "prediction"])
    n = 0
    bar = _progress(len(paths), progress)
    for done, x in _batches(paths, meta["preprocess"], batch_size, skipped):
        out = onnx_model.run(x, batch_size)
        if classification:
            probs = softmax(out)
            for path, p in zip(done, probs, strict=True):
                k = int(p.argmax())
                w.writerow([str(path), classes[k], f"{p[k]:.6f}", *[f"{v:.6f}" for v in p]])
        else:
            for path, value in zip(done, out[:, 0], strict=True):
                w.writerow([str(path), f"{value:.6g}"])
        n += len(done)
        bar.update(len(done))
    bar.close()
    skipped_file = None
    if skipped:
        skipped_file = output.with_name(output.stem + ".skipped.csv")
        lines = io.StringIO()
        sw = csv.writer(lines)
        sw.writerow(["path", "reason"])
        sw.writerows(skipped)
        write_text_atomic(skipped_file, lines.getvalue())
        warnings.warn(f"{len(skipped)} of {len(paths)} images skipped (listed in {skipped_file}), "
                      f"e.g. {skipped[0][0]}: {skipped[0][1]}", stacklevel=2)
    if n == 0:
        raise DataError(f"no image of {source} could be read ({len(skipped)} skipped, see {skipped_file}); "
                        f"nothing written to {output}")
    write_text_atomic(output, buf.getvalue())
    return {"output": str(output), "n": n, "skipped": len(skipped),
            "skipped_file": str(skipped_file) if skipped_file else None, "model": str(onnx_model.path)}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled or total < 512:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="predict", unit="img")
