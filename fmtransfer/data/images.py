"""Safe image reading: PNG, JPEG, TIFF (multi-band too), grey/RGB, with explicit channel conversion.

``read_image`` returns ``(H, W, C)`` float32 in [0, 1] for integer images (floats pass through).
``scan_images`` decodes every file once before training: unreadable ones are reported, not crashed on.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

TIFF_SUFFIXES = (".tif", ".tiff")


class UnreadableImage(Exception):
    """The file could not be decoded (corrupt, truncated, missing, not an image)."""


class ChannelMismatch(Exception):
    """The image decodes, but its channels cannot be converted to what the recipe asks for."""


def read_raw(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` into an ``(H, W, C)`` array of its native dtype. Raises UnreadableImage."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            arr = np.asarray(tifffile.imread(path))
            if arr.ndim == 3 and arr.shape[0] < min(arr.shape[1:]) and arr.shape[0] <= 64:
                arr = np.moveaxis(arr, 0, -1)  # bands-first (C, H, W), as most multi-band TIFFs are
        else:
            with Image.open(path) as img:
                img.load()
                if img.mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    img = img.convert("RGB")
                elif img.mode == "1":
                    img = img.convert("L")
                arr = np.asarray(img)
    except FileNotFoundError as e:
        raise UnreadableImage("file not found") from e
    except PermissionError as e:
        raise UnreadableImage("permission denied") from e
    except Exception as e:  # noqa: BLE001 - every decoder failure means the same thing here
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.size == 0:
        raise UnreadableImage(f"decoded to an array of shape {arr.shape}, expected (H, W[, C])")
    return arr


def to_unit_float(arr: np.ndarray) -> np.ndarray:
    """Integer images scaled to [0, 1] by their dtype's range; float images pass through as float32."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    return arr.astype(np.float32, copy=False)


def convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """Convert an ``(H, W, C)`` array to ``channels`` channels where that is well defined.

    grey -> RGB repeats; RGB(A) -> grey uses ITU-R 601 luma; RGBA -> RGB and LA -> L drop alpha.
    Anything else (e.g. 4 bands -> 3) raises ChannelMismatch.
    """
    have = arr.shape[-1]
    if have == channels:
        return arr
    if have == 2 and channels == 1:  # grey + alpha
        return arr[..., :1]
    if have == 4 and channels == 3:  # RGBA
        return arr[..., :3]
    if have == 1 and channels == 3:
        return np.repeat(arr, 3, axis=-1)
    if have in (3, 4) and channels == 1:
        rgb = arr[..., :3].astype(np.float32)
        luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return luma[..., None].astype(arr.dtype) if np.issubdtype(arr.dtype, np.integer) else luma[..., None]
    raise ChannelMismatch(f"has {have} channel(s), cannot convert to {channels}")


def read_image(path: str | os.PathLike, channels: int) -> np.ndarray:
    """Decode, convert to ``channels`` and scale: ``(H, W, channels)`` float32."""
    return to_unit_float(convert_channels(read_raw(path), channels))


@dataclass
class ScanResult:
    """Outcome of scanning n image files.

    Attributes:
        ok: (n,) bool, True where the file decoded and converts to the wanted channels.
        sha256: (n,) hex digest of each readable file's bytes ("" where unreadable).
        unreadable: {index: reason} for files that did not decode.
        mismatched: {index: reason} for files whose channels cannot be converted.
    """

    ok: np.ndarray
    sha256: list[str]
    unreadable: dict[int, str] = field(default_factory=dict)
    mismatched: dict[int, str] = field(default_factory=dict)


def _scan_one(path: Path, channels: int) -> tuple[str, str | None, str | None]:
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        return "", f"{type(e).__name__}: {e.strerror or e}", None
    try:
        convert_channels(read_raw(path), channels)
    except UnreadableImage as e:
        return digest, str(e), None
    except ChannelMismatch as e:
        return digest, None, str(e)
    return digest, None, None


class _ScanCache:
    """Results of earlier scans keyed by (path, size, mtime): re-runs over 100k files do not re-decode."""

    def __init__(self, cache_dir: Path | None, key: str):
        self.path = cache_dir / f"scan-{key}.json" if cache_dir else None
        self.entries: dict[str, list] = {}
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a broken cache is only a slower scan

    @staticmethod
    def stamp(path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def save(self) -> None:
        if not self.path:
            return
        from fmtransfer.lineage.io import write_text_atomic

        try:
            write_text_atomic(self.path, json.dumps(self.entries))
        except OSError:
            pass  # cache is an optimisation; a read-only home must not fail the run


def default_cache_dir() -> Path | None:
    value = os.environ.get("FMTRANSFER_CACHE", str(Path.home() / ".cache" / "fmtransfer"))
    return Path(value) if value else None


def scan_images(paths: list[Path], channels: int, *, workers: int | None = None,
                cache_dir: Path | None = None, desc: str = "scanning images") -> ScanResult:
    """Decode every file once (threaded, with a progress bar) and hash its bytes.

    Args:
        paths: n image files.
        channels: the channel count the recipe wants; files that cannot convert are ``mismatched``.
        workers: decoding threads (default: CPU count, at most 16).
        cache_dir: where to keep the scan cache (None: no cache).
    """
    n = len(paths)
    key = hashlib.sha256(f"{channels}|{n}|{paths[0] if n else ''}".encode()).hexdigest()[:16]
    cache = _ScanCache(cache_dir, key)
    stamps = [cache.stamp(p) for p in paths]
    results: list[tuple[str, str | None, str | None] | None] = [
        tuple(cache.entries[s]) if s and s in cache.entries else None for s in stamps]  # type: ignore[misc]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        workers = workers or min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            it = pool.map(lambda i: _scan_one(paths[i], channels), todo, chunksize=16)
            for i, res in zip(todo, tqdm(it, total=len(todo), desc=desc, unit="img",
                                         disable=len(todo) < 200, leave=False)):
                results[i] = res
                if stamps[i] and res[1] is None:  # only remember good and mismatched files
                    cache.entries[stamps[i]] = list(res)
        cache.save()
    ok = np.ones(n, dtype=bool)
    out = ScanResult(ok=ok, sha256=[""] * n)
    for i, (digest, unreadable, mismatch) in enumerate(results):  # type: ignore[misc]
        out.sha256[i] = digest
        if unreadable is not None:
            ok[i] = False
            out.unreadable[i] = unreadable
        elif mismatch is not None:
            ok[i] = False
            out.mismatched[i] = mismatch
    return out
