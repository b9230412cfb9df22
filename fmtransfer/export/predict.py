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
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fmtransfer.data.images import ChannelMismatch, UnreadableImage, read_image
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.export.device_monitor import (
    EMBEDDING_OUTPUT,
    DeviceMonitor,
    DeviceMonitorSettings,
    find_reference,
    open_reference,
    require_embedding,
)
from fmtransfer.export.runtime import OnnxModel, softmax
from fmtransfer.export.scene import (
    ChangeGate,
    Frame,
    SceneSettings,
    agreement,
    read_sequence,
    scene_summary,
    scene_warnings,
    signature,
)
from fmtransfer.lineage.io import sha256_file, write_text_atomic

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
    return preprocess_array(read_image(path, int(pre["channels"])), pre)  # decoded exactly as training decodes


def preprocess_array(arr: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """A decoded (H, W, C) image in [0, 1] -> (C, H, W) float32 as the model expects."""
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


def _header(classes: list[str] | None, classification: bool) -> list[str]:
    return (["prediction", "confidence", *[f"p_{c}" for c in classes]] if classification else ["prediction"])


def _cells(out: np.ndarray, classes: list[str] | None, classification: bool) -> list[list[str]]:
    """Model outputs (n, k) -> the CSV cells of each row after its path (classification: softmax first)."""
    if not classification:
        return [[f"{value:.6g}"] for value in out[:, 0]]
    rows = []
    for p in softmax(out):
        k = int(p.argmax())
        rows.append([classes[k], f"{p[k]:.6f}", *[f"{v:.6f}" for v in p]])
    return rows


def predict_files(model: str | Path, source: str | Path, output: str | Path, *, batch_size: int = 64,
                  progress: bool = True, force: bool = False, scene: SceneSettings | None = None,
                  monitor: DeviceMonitorSettings | None = None) -> dict[str, Any]:
    """Predict every image of ``source`` and write ``output`` (CSV) atomically.

    Classification rows: ``path, prediction, confidence, p_<class>...``; regression: ``path, prediction``.
    Skipped images go to ``<output stem>.skipped.csv`` (path, reason) and a warning. ``force``: serve a model its
    export's gates rejected (refused otherwise). ``scene``: ``source`` is a CSV of site sequences and an image that
    barely changed since its site's last processed one reuses that prediction (:func:`predict_sequence`).
    ``monitor``: each row also gets ``ood_score`` and ``ood_flag`` (the model's ``embedding`` output against the
    reference statistics stored beside it), and the result the input's drift statistics (:class:`DeviceMonitor`).

    Returns:
        ``{"output", "n", "skipped", "skipped_file", "model"}``, and ``"scene"`` (:func:`scene_summary`) with
        ``scene``, ``"monitor"`` (:meth:`DeviceMonitor.summary`) with ``monitor``.
    """
    onnx_model = OnnxModel.load(model, force=force)
    meta = onnx_model.meta
    if meta["task"] == "embedding":
        raise DataError(f"model {model} is a head-less backbone: it outputs embeddings, not predictions; give it a "
                        f"head with fmtransfer adapt and export that")
    if scene is not None and monitor is not None:
        raise ConfigError("scene.enabled and monitor.enabled together: a reused prediction has no embedding of its "
                          "own to score; run one of them")
    device = _device_monitor(onnx_model, monitor) if monitor is not None else None
    skipped: list[tuple[str, str]] = []
    output = Path(output)
    if scene is not None:
        frames = read_sequence(source, scene)
        n_listed = len(frames)
        header, rows, summary = predict_sequence(onnx_model, frames, scene, batch_size, skipped, progress)
    else:
        paths = list_inputs(source)
        n_listed, summary = len(paths), None
        header, rows = ["path", *_header(onnx_model.classes, meta["task"] == "classification")], []
        seen: dict[str, list[np.ndarray]] = {"logits": [], "embeddings": [], "scores": []}
        bar = _progress(len(paths), progress)
        for done, x in _batches(paths, meta["preprocess"], batch_size, skipped):
            if device is None:
                out = onnx_model.run(x, batch_size)
                cells = _cells(out, onnx_model.classes, meta["task"] == "classification")
            else:
                out, emb = onnx_model.run_outputs(x, [meta["output_name"], EMBEDDING_OUTPUT], batch_size)
                scores = device.ood(emb)
                cells = [[*c, f"{v:.6f}", str(int(f))] for c, v, f in zip(
                    _cells(out, onnx_model.classes, meta["task"] == "classification"), scores,
                    device.stats.ood.flags(scores), strict=True)]
                for key, value in (("logits", out), ("embeddings", emb), ("scores", scores)):
                    seen[key].append(value)
            rows.extend([str(path), *c] for path, c in zip(done, cells, strict=True))
            bar.update(len(done))
        bar.close()
        if device is not None:
            header += ["ood_score", "ood_flag"]
            if rows:
                logits = np.concatenate(seen["logits"])
                summary = {"monitor": device.summary(
                    softmax(logits) if meta["task"] == "classification" else None,
                    np.concatenate(seen["embeddings"]), np.concatenate(seen["scores"]))}
    skipped_file = _write_skipped(output, skipped, n_listed) if skipped else None
    if not rows:
        raise DataError(f"no image of {source} could be read ({len(skipped)} skipped, see {skipped_file}); "
                        f"nothing written to {output}")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_text_atomic(output, buf.getvalue())
    result = {"output": str(output), "n": len(rows), "skipped": len(skipped),
              "skipped_file": str(skipped_file) if skipped_file else None, "model": str(onnx_model.path)}
    if summary is not None:
        result.update(summary if device is not None else {"scene": summary})
    return result


def _device_monitor(onnx_model: OnnxModel, settings: DeviceMonitorSettings) -> DeviceMonitor:
    """The model's ``embedding`` output checked, and the reference statistics stored for this very file."""
    require_embedding(onnx_model.path, onnx_model.output_names)
    sha = sha256_file(onnx_model.path)
    path = find_reference(onnx_model.path, sha, settings.reference)
    dim = (onnx_model.meta.get("embedding") or {}).get("dim")
    return DeviceMonitor(open_reference(path, onnx_model.path, sha, dim), settings)


def _write_skipped(output: Path, skipped: list[tuple[str, str]], n_listed: int) -> Path:
    skipped_file = output.with_name(output.stem + ".skipped.csv")
    lines = io.StringIO()
    sw = csv.writer(lines)
    sw.writerow(["path", "reason"])
    sw.writerows(skipped)
    write_text_atomic(skipped_file, lines.getvalue())
    warnings.warn(f"{len(skipped)} of {n_listed} images skipped (listed in {skipped_file}), "
                  f"e.g. {skipped[0][0]}: {skipped[0][1]}", stacklevel=3)
    return skipped_file


class _Queue:
    """Preprocessed frames waiting for the model, run ``batch_size`` at a time; outputs by frame index and the
    seconds spent in the model."""

    def __init__(self, model: OnnxModel, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.pending: list[tuple[int, np.ndarray]] = []
        self.outputs: dict[int, np.ndarray] = {}
        self.confidence: dict[int, float] = {}  # top softmax probability, classification only
        self.seconds = 0.0

    def add(self, index: int, x: np.ndarray) -> None:
        self.pending.append((index, x))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        start = time.perf_counter()
        out = self.model.run(np.stack([x for _, x in self.pending]), self.batch_size)
        self.seconds += time.perf_counter() - start
        self.outputs.update((i, row) for (i, _), row in zip(self.pending, out, strict=True))
        if self.model.meta["task"] == "classification":
            self.confidence.update((i, float(c)) for (i, _), c in zip(self.pending, softmax(out).max(1), strict=True))
        self.pending = []

    def stacked(self, indices: list[int]) -> np.ndarray:
        return np.stack([self.outputs[i] for i in indices])


def _interleaved(frames: list[Frame]) -> list[int]:
    """Frame positions taken one per site in turn (each site's first frame, then each site's second, ...): a batch
    then holds frames of many sites, and a site's next frame rarely waits on its own pending prediction."""
    rank: dict[str, int] = {}
    keys = []
    for i, frame in enumerate(frames):
        keys.append((rank.get(frame.site, 0), i))
        rank[frame.site] = rank.get(frame.site, 0) + 1
    return [i for _, i in sorted(keys)]


def predict_sequence(onnx_model: OnnxModel, frames: list[Frame], settings: SceneSettings, batch_size: int,
                     skipped: list[tuple[str, str]], progress: bool = False
                     ) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    """Frames grouped by site and in order -> the CSV header, its rows (in ``frames``' order) and the scene summary.

    Each readable frame is decoded once; its signature decides (:class:`ChangeGate`) whether the model runs on it or
    it reuses the prediction of its site's last processed frame (``reused_from`` names that frame's path), unless that
    prediction's confidence is under ``settings.min_confidence``. With ``settings.verify`` the model also runs on the
    reused frames, apart (its time is not counted), for the agreement.
    """
    pre = onnx_model.meta["preprocess"]
    classification = onnx_model.meta["task"] == "classification"
    gate = ChangeGate(settings.threshold, settings.max_skips)
    model, check = _Queue(onnx_model, batch_size), _Queue(onnx_model, batch_size)
    kept: list[int] = []  # positions in frames, in the gate's order
    reused: list[int | None] = []
    refused = 0
    # reuses of a frame whose prediction was still queued: checked once it has run, instead of flushing the queue
    # for one frame (an unsure model then ran one image at a time and the gate cost more than it saved)
    provisional: dict[int, tuple[int, np.ndarray]] = {}

    def trusted(index: int) -> bool:
        nonlocal refused
        if not classification or settings.min_confidence <= 0 or index not in model.confidence:
            return True
        ok = model.confidence[index] >= settings.min_confidence
        refused += not ok
        return ok

    gate_seconds = 0.0
    bar = _progress(len(frames), progress)
    for position in _interleaved(frames):
        frame = frames[position]
        bar.update(1)
        try:
            arr = read_image(frame.path, int(pre["channels"]))
        except (UnreadableImage, ChannelMismatch) as e:
            skipped.append((str(frame.path), str(e) if isinstance(e, UnreadableImage) else f"channels: {e}"))
            continue
        start, in_model = time.perf_counter(), model.seconds
        source = gate.decide(frame.site, signature(arr, settings.size), trusted)
        gate_seconds += time.perf_counter() - start - (model.seconds - in_model)
        index = len(kept)
        kept.append(position)
        reused.append(source)
        if source is None:
            model.add(index, preprocess_array(arr, pre))
        else:
            if classification and settings.min_confidence > 0 and source not in model.confidence:
                provisional[index] = (source, preprocess_array(arr, pre))
            if settings.verify:
                check.add(index, preprocess_array(arr, pre))
    bar.close()
    model.flush()
    for index, (source, x) in provisional.items():
        if model.confidence[source] < settings.min_confidence:
            refused += 1
            reused[index] = None
            model.add(index, x)
    model.flush()
    check.flush()
    if not kept:
        return [], [], {}
    written = model.stacked([i if r is None else r for i, r in enumerate(reused)])
    summary = scene_summary(reused, gate_seconds, model.seconds, len(model.outputs))
    summary.update(threshold=settings.threshold, min_confidence=settings.min_confidence,
                   max_skips=settings.max_skips, size=settings.size, sites=len(gate.sites),
                   processed_for_low_confidence=refused)
    header = ["path", settings.site_column, settings.order_column, *_header(onnx_model.classes, classification),
              "reused_from", "change"]
    full_cells = None
    if settings.verify:
        full = np.stack([model.outputs[i] if r is None else check.outputs[i] for i, r in enumerate(reused)])
        summary["verify"] = agreement(reused, _decision(written, classification), _decision(full, classification),
                                      classification)
        header.append("full_prediction")
        full_cells = _cells(full, onnx_model.classes, classification)
    summary["warnings"] = scene_warnings(summary, settings.min_agreement)
    for text in summary["warnings"]:
        warnings.warn(f"scene: {text}", stacklevel=2)
    cells = _cells(written, onnx_model.classes, classification)
    rows = []
    for i in sorted(range(len(kept)), key=kept.__getitem__):
        frame, r, change = frames[kept[i]], reused[i], gate.changes[i]
        row = [str(frame.path), frame.site, frame.order, *cells[i], "" if r is None else str(frames[kept[r]].path),
               "" if change is None else f"{change:.4f}"]
        if full_cells is not None:
            row.append(full_cells[i][0])
        rows.append(row)
    return header, rows, summary


def _decision(out: np.ndarray, classification: bool) -> np.ndarray:
    return out.argmax(1) if classification else out[:, 0]


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
