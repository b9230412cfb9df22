"""Safe image reading: PNG, JPEG, TIFF (multi-band too), grey/RGB, with explicit channel conversion.

``read_image`` returns ``(H, W, C)`` float32 in [0, 1]; how values are scaled is stated in :func:`to_unit_float`.
``scan_images`` decodes every file once before training: unreadable ones are reported, not crashed on.

Nothing in a file is trusted: its pixel count is checked against ``max_pixels`` from the header, before any
pixel is decoded; a TIFF's colour model (CMYK, palette, min-is-white) is honoured; bands that are not colour
channels (a 4-band RGB + NIR TIFF, say) are never converted by guessing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fmtransfer.lineage.io import sha256_file
from fmtransfer.paths import cache_dir

TIFF_SUFFIXES = (".tif", ".tiff")
# 8192 x 8192: above every phone and nearly every camera sensor (<= 61 MP), below Pillow's own warning
# threshold (~89 MP), and at most ~1 GB per RGB image once it is float32, per decoding thread or worker.
DEFAULT_MAX_PIXELS = 8192 * 8192


class UnreadableImage(Exception):
    """The file could not be decoded (corrupt, truncated, missing, not an image, refused)."""


class ImageTooLarge(UnreadableImage):
    """The header declares more pixels than the cap allows; nothing was decoded."""

    def __init__(self, width: int, height: int, limit: int):
        self.width, self.height, self.limit = width, height, limit
        super().__init__(f"{width}x{height} = {width * height:,} pixels, more than the limit of {limit:,} "
                         f"pixels; not decoded")


class ValuesOutOfRange(UnreadableImage):
    """A float image whose values are not all finite and within [0, 1]."""


class ChannelMismatch(Exception):
    """The image decodes, but its channels cannot be converted to what the recipe asks for."""


@dataclass(frozen=True)
class Decoded:
    """A decoded file.

    Attributes:
        pixels: ``(H, W, C)`` in the file's own dtype.
        colour: True when the channels are grey, grey + alpha, RGB or RGBA, so that converting between those is
            meaningful; False for bands with no colour model (multi-band TIFFs), which only pass unconverted.
    """

    pixels: np.ndarray
    colour: bool


def _bands_first(shape: tuple[int, ...], axes: str) -> bool:
    """Whether a 3-d TIFF series of ``shape`` and tifffile ``axes`` holds its bands first."""
    if axes.endswith("S"):  # samples last: (H, W, C)
        return False
    if axes.startswith("S"):  # planar samples: (C, H, W)
        return True
    # pages stacked as bands, as most multi-band TIFFs are: few of them, fewer than rows or columns
    return shape[0] < min(shape[1:]) and shape[0] <= 64


def _tiff_hwc(shape: tuple[int, ...], axes: str) -> tuple[int, int, int]:
    """(H, W, C) of a TIFF series from its header."""
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 3:
        if _bands_first(shape, axes):
            return shape[1], shape[2], shape[0]
        return shape[0], shape[1], shape[2]
    raise UnreadableImage(f"holds an array of shape {tuple(shape)} (axes {axes}), expected (H, W[, C])")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(width, height, max_pixels)


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` CMYK -> ``(H, W, 3)`` RGB, same dtype: ``R = (1 - C)(1 - K)`` on the dtype's range, the
    formula Pillow uses for its CMYK mode (no ICC colour management)."""
    top = float(np.iinfo(cmyk.dtype).max) if np.issubdtype(cmyk.dtype, np.integer) else 1.0
    ink = cmyk.astype(np.float64)
    rgb = (top - ink[..., :3]) * (top - ink[..., 3:4]) / top
    return np.rint(rgb).astype(cmyk.dtype) if np.issubdtype(cmyk.dtype, np.integer) else rgb.astype(cmyk.dtype)


# TIFF compressions whose decoder turns YCbCr into RGB (JPEG, old-style JPEG, lossy JPEG, JPEG 2000).
_JPEG_CODECS = (6, 7, 34892, 33007)


def _tiff_colour(arr: np.ndarray, page) -> Decoded:
    """Apply the page's photometric interpretation to ``arr`` (H, W, C), as tifffile returns raw samples."""
    from tifffile import PHOTOMETRIC

    photometric = page.photometric
    extras = tuple(int(e) for e in (page.extrasamples or ()))
    alpha = len(extras) == 1 and extras[0] in (1, 2)  # associated or unassociated alpha
    channels = arr.shape[-1]
    if photometric == PHOTOMETRIC.SEPARATED:
        tag = page.tags.get("InkSet")
        inkset = tag.value if tag is not None else 1
        if channels != 4 or extras or inkset != 1:
            raise UnreadableImage(f"TIFF photometric=SEPARATED with {channels} sample(s) and InkSet={inkset} is not "
                                  f"supported; only 4-sample CMYK is (converted to RGB)")
        return Decoded(cmyk_to_rgb(arr), True)
    if photometric == PHOTOMETRIC.PALETTE:
        colormap = page.colormap
        if colormap is None or channels != 1:
            raise UnreadableImage("TIFF photometric=PALETTE without a one-sample index and a colour map")
        return Decoded(np.moveaxis(colormap[:, arr[..., 0]], 0, -1), True)
    if photometric == PHOTOMETRIC.MINISWHITE:
        grey = channels - len(extras)  # extra samples (alpha) are not inverted
        arr = arr.copy()
        if np.issubdtype(arr.dtype, np.integer):
            arr[..., :grey] = np.iinfo(arr.dtype).max - arr[..., :grey]
        elif arr.dtype == np.bool_:
            arr[..., :grey] = ~arr[..., :grey]
        else:
            arr[..., :grey] = 1.0 - arr[..., :grey]
        return Decoded(arr, channels == 1 or (channels == 2 and alpha))
    if photometric == PHOTOMETRIC.MINISBLACK:
        return Decoded(arr, channels == 1 or (channels == 2 and alpha))
    if photometric == PHOTOMETRIC.RGB or (photometric == PHOTOMETRIC.YCBCR and page.compression in _JPEG_CODECS):
        return Decoded(arr, channels == 3 or (channels == 4 and alpha))
    name = getattr(photometric, "name", photometric)
    raise UnreadableImage(f"TIFF photometric={name} is not supported; save it as grey, RGB, CMYK or as bands "
                          f"(MINISBLACK)")


def _decode_tiff(path: Path, max_pixels: int) -> Decoded:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape, axes = tuple(series.shape), series.axes
        height, width, _ = _tiff_hwc(shape, axes)
        _check_pixels(width, height, max_pixels)
        page = series.keyframe
        arr = np.asarray(series.asarray())
        if arr.ndim == 2:
            arr = arr[:, :, None]
        elif _bands_first(shape, axes):
            arr = np.moveaxis(arr, 0, -1)
        if arr.shape[-1] > 1 and len(series.pages) > 1:  # bands stored as pages have no colour model
            return Decoded(arr, False)
        return _tiff_colour(arr, page)


# Pillow modes that are converted on reading, so that every image comes out as L, LA, RGB or RGBA (or a
# one-channel integer or float mode).
_PIL_CONVERT = {"P": None, "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "1": "L",
                "RGBX": "RGB", "RGBa": "RGBA", "La": "LA"}


def _decode_pil(path: Path, max_pixels: int) -> Decoded:
    with Image.open(path) as img:
        _check_pixels(*img.size, max_pixels)
        img.load()
        if img.mode in _PIL_CONVERT:
            target = _PIL_CONVERT[img.mode] or ("RGBA" if "transparency" in img.info else "RGB")
            img = img.convert(target)
        arr = np.asarray(img)
        return Decoded(arr[:, :, None] if arr.ndim == 2 else arr, True)


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    return f"{type(e).__name__}: {e.strerror or e}"


def decode(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode ``path`` (TIFF with tifffile, everything else with Pillow) into its native dtype.

    Args:
        max_pixels: refuse files whose header declares more than this many pixels (H x W), before decoding.
    Raises:
        UnreadableImage: missing, corrupt, refused (:class:`ImageTooLarge`) or of an unsupported colour model.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            decoded = _decode_tiff(path, max_pixels)
        else:
            decoded = _decode_pil(path, max_pixels)
    except UnreadableImage:
        raise
    except FileNotFoundError as e:
        raise UnreadableImage("file not found") from e
    except PermissionError as e:
        raise UnreadableImage("permission denied") from e
    except OSError as e:
        raise UnreadableImage(_os_reason(e)) from e
    except Exception as e:  # noqa: BLE001 - every decoder failure means the same thing here
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e
    if decoded.pixels.size == 0:
        raise UnreadableImage(f"decoded to an empty array of shape {decoded.pixels.shape}")
    return decoded


def read_raw(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` into an ``(H, W, C)`` array of its native dtype (see :func:`decode`)."""
    return decode(path, max_pixels=max_pixels).pixels


def check_float_range(arr: np.ndarray) -> None:
    """Float images must be finite and within [0, 1]; other dtypes pass. Raises ValuesOutOfRange."""
    if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
        return
    if not np.isfinite(arr).all():
        raise ValuesOutOfRange("float image holds NaN or infinite values; float images must be finite and within "
                               "[0, 1] (fill no-data values, or store the image as uint8/uint16)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValuesOutOfRange(f"float values span [{lo:g}, {hi:g}], outside [0, 1]: float images are used as "
                               f"they are, so rescale them to [0, 1] (or store them as uint8/uint16, which are "
                               f"scaled by their type's range)")


def to_unit_float(arr: np.ndarray) -> np.ndarray:
    """An image's values as float32, by one rule a user can predict.

    - unsigned and signed integers are divided by their dtype's maximum (uint8 by 255, uint16 by 65535, int16
      by 32767), so unsigned images land in [0, 1];
    - booleans become 0 and 1;
    - floats are used as they are, and must already be finite and within [0, 1]; anything else raises
      :class:`ValuesOutOfRange` (an :class:`UnreadableImage`: the file is skipped and its range reported).
    """
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    check_float_range(arr)
    return arr.astype(np.float32, copy=False)


def convert_channels(arr: np.ndarray, channels: int, *, colour: bool = True) -> np.ndarray:
    """Convert an ``(H, W, C)`` array to ``channels`` channels where that is well defined.

    grey -> RGB repeats; RGB(A) -> grey uses ITU-R 601 luma; RGBA -> RGB and LA -> L drop alpha.
    Anything else (e.g. 6 bands -> 3) raises ChannelMismatch, and so does any change of channel count when
    ``colour`` is False (bands without a colour model, such as an RGB + NIR TIFF, are never guessed at).
    """
    have = arr.shape[-1]
    if have == channels:
        return arr
    if not colour:
        raise ChannelMismatch(f"has {have} channel(s) that are bands, not colour (grey, RGB or RGBA with an "
                              f"alpha band), so they cannot be converted to {channels}")
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


def read_image(path: str | os.PathLike, channels: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode, convert to ``channels`` and scale (:func:`to_unit_float`): ``(H, W, channels)`` float32.

    Raises:
        UnreadableImage: see :func:`decode`; also float values outside [0, 1].
        ChannelMismatch: the channels cannot be converted.
    """
    decoded = decode(path, max_pixels=max_pixels)
    return to_unit_float(convert_channels(decoded.pixels, channels, colour=decoded.colour))


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


def _scan_one(path: Path, channels: int, max_pixels: int) -> tuple[str, str | None, str | None]:
    try:
        digest = sha256_file(path)  # streamed: a file is never held whole in memory
    except OSError as e:
        return "", _os_reason(e), None
    try:
        decoded = decode(path, max_pixels=max_pixels)
        check_float_range(convert_channels(decoded.pixels, channels, colour=decoded.colour))
    except ImageTooLarge as e:
        return digest, f"{e} (data.max_pixels={max_pixels})", None
    except UnreadableImage as e:
        return digest, str(e), None
    except ChannelMismatch as e:
        return digest, None, str(e)
    return digest, None, None


class _ScanCache:
    """Results of earlier scans keyed by each file's stat: re-runs over 100k files do not re-decode.

    The key holds the device, inode and change time besides size and mtime: replacing a file (new inode) or
    rewriting it in place (new ctime, which ``os.utime`` cannot set back) is noticed even at the same size and
    mtime.
    """

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
        return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"

    def save(self) -> None:
        if not self.path:
            return
        from fmtransfer.lineage.io import write_text_atomic

        try:
            write_text_atomic(self.path, json.dumps(self.entries))
        except OSError:
            pass  # cache is an optimisation; a read-only home must not fail the run


def default_cache_dir() -> Path | None:
    """The scan cache's folder (:func:`fmtransfer.paths.cache_dir`; None: off)."""
    return cache_dir()


def scan_images(paths: list[Path], channels: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                workers: int | None = None, cache_dir: Path | None = None,
                desc: str = "scanning images") -> ScanResult:
    """Decode every file once (threaded, with a progress bar) and hash its bytes.

    Args:
        paths: n image files.
        channels: the channel count the recipe wants; files that cannot convert are ``mismatched``.
        max_pixels: files with more pixels are ``unreadable`` (refused from their header, never decoded).
        workers: decoding threads (default: CPU count, at most 16).
        cache_dir: where to keep the scan cache (None: no cache).
    """
    n = len(paths)
    key = hashlib.sha256(f"{channels}|{max_pixels}|{n}|{paths[0] if n else ''}".encode()).hexdigest()[:16]
    cache = _ScanCache(cache_dir, key)
    stamps = [cache.stamp(p) for p in paths]
    results: list[tuple[str, str | None, str | None] | None] = [
        tuple(cache.entries[s]) if s and s in cache.entries else None for s in stamps]  # type: ignore[misc]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        workers = workers or min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            it = pool.map(lambda i: _scan_one(paths[i], channels, max_pixels), todo, chunksize=16)
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
