"""Process only when the scene changed: a cheap change test for image sequences of fixed sites. numpy + PIL only.

For each site, images are taken in their order; each is compared with the LAST PROCESSED image of its site (not the
previous image, so that a slow drift of small steps still adds up to a change and gets processed). When it moved
less than ``threshold`` the model is not run and that processed image's prediction is reused.

The change test is a signature: the image in grey, averaged down to ``size`` x ``size`` pixels (PIL's box filter:
each signature pixel is the mean of its area, so pixel noise averages out), then standardised to mean 0 and standard
deviation 1. The distance of two signatures is the root mean square of their difference, which equals
``sqrt(2 * (1 - r))`` with ``r`` their Pearson correlation: 0 for the same scene, about 1.4 for unrelated ones,
unchanged by a global brightness or contrast change. It costs a resize of the decoded image and a 256-value
difference, far less than a forward pass.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.errors import ConfigError, DataError

# Measured on real images (scripts/bench_scene.py, docs/shadow_and_scene.md), 8x8 signatures: 99.9% of pairs of
# different images lie at 0.34 or more on mnist_global and 0.27 or more on uci_digits_region (28x28), while pixel
# noise of sigma 0.1 stays under 0.17 and brightness/contrast changes near 0. 0.2 sits under the smaller of the two
# 0.1% quantiles with a margin; on sequences of real images it kept the agreement of reused predictions with full
# processing at 0.998 (global model, mnist_global) and 0.998 (region model, uci_digits_region), where 0.25 fell to
# 0.987 on the region: 1-pixel shifts of its blurry upsampled digits lie near 0.18 and flip the model's answer on a
# few. 1-pixel shifts of thin 28x28 MNIST strokes (median 0.36) count as changes and are processed.
DEFAULT_THRESHOLD = 0.2
DEFAULT_SIZE = 8
DEFAULT_MAX_SKIPS = 10
DEFAULT_MIN_CONFIDENCE = 0.9
DEFAULT_MIN_AGREEMENT = 0.99
# the standard deviation below which an image counts as flat: its signature is not blown up from sensor noise
MIN_STD = 0.02


@functools.lru_cache(maxsize=64)
def _box_weights(n: int, size: int) -> np.ndarray:
    """(size, n) float32: row i averages the input pixels under output cell i, each weighted by the length of it that
    the cell covers (area averaging, as PIL's box filter; an input smaller than ``size`` is spread over cells)."""
    step = n / size
    edges = np.arange(size + 1) * step
    lo, hi = edges[:-1, None], edges[1:, None]
    pixels = np.arange(n)[None, :]
    overlap = np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0, None)
    return (overlap / step).astype(np.float32)


def signature(image: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """A decoded image ``(H, W)`` or ``(H, W, C)`` (float in [0, 1] or uint8) -> ``(size * size,)`` float32.

    Grey (the channel mean), box-averaged to ``size`` x ``size`` (two small matrix products: far cheaper than
    resizing through PIL), standardised (a flat image gives zeros).
    """
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] == 1 else arr.mean(axis=2, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"signature needs an (H, W) or (H, W, C) image; got shape {np.shape(image)}")
    scale = np.float32(1 / 255) if np.asarray(image).dtype == np.uint8 else np.float32(1)
    small = (_box_weights(arr.shape[0], size) @ arr.astype(np.float32, copy=False)
             @ _box_weights(arr.shape[1], size).T).ravel()
    centred = (small - small.mean()) * scale
    std = float(np.sqrt(centred.dot(centred) / centred.size))
    return centred / max(std, MIN_STD)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean square difference of two signatures (0: the same scene; about 1.41: unrelated)."""
    if a.shape != b.shape:
        raise DataError(f"signatures of different sizes: {a.shape} and {b.shape}")
    diff = a - b
    return float(np.sqrt(diff.dot(diff) / diff.size))


@dataclass(frozen=True)
class SceneSettings:
    """``predict``'s ``scene`` config.

    Attributes:
        threshold: a distance below this reuses the site's last processed prediction.
        min_confidence: classification only: a processed prediction whose top probability is below this is never
            reused (an ambiguous image flips class under noise the gate cannot see); 0 reuses any.
        max_skips: after this many reuses in a row, a site's next image is processed whatever its distance
            (0: never reuse).
        size: the signature's side in pixels.
        path_column, site_column, order_column: the input CSV's columns.
        verify: also run the model on the reused images and report the agreement (costs the time it saves).
        min_agreement: with ``verify``, an agreement below this is warned about: reuse changes answers.
    """

    threshold: float = DEFAULT_THRESHOLD
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    max_skips: int = DEFAULT_MAX_SKIPS
    size: int = DEFAULT_SIZE
    path_column: str = "path"
    site_column: str = "site"
    order_column: str = "order"
    verify: bool = False
    min_agreement: float = DEFAULT_MIN_AGREEMENT

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ConfigError(f"scene.threshold={self.threshold!r}: expected a distance >= 0 (signatures of the same "
                              f"scene lie near 0, unrelated ones near 1.41; default {DEFAULT_THRESHOLD})")
        if isinstance(self.min_confidence, bool) or not isinstance(self.min_confidence, (int, float)) \
                or not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"scene.min_confidence={self.min_confidence!r}: expected a probability in [0, 1] (0 "
                              f"reuses any prediction)")
        if isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int) or self.max_skips < 0:
            raise ConfigError(f"scene.max_skips={self.max_skips!r}: expected an integer >= 0 (0 processes every "
                              f"image)")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 2 <= self.size <= 256:
            raise ConfigError(f"scene.size={self.size!r}: expected an integer in [2, 256] (signature side, pixels)")
        if isinstance(self.min_agreement, bool) or not isinstance(self.min_agreement, (int, float)) \
                or not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"scene.min_agreement={self.min_agreement!r}: expected a share in [0, 1]")
        if not isinstance(self.verify, bool):
            raise ConfigError(f"scene.verify={self.verify!r}: expected true or false")
        for key in ("path_column", "site_column", "order_column"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"scene.{key}={getattr(self, key)!r}: expected a column name")

    @classmethod
    def from_dict(cls, node: dict[str, Any]) -> SceneSettings:
        """From the config's ``scene`` mapping (its ``enabled`` key is the caller's)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(node) - known - {"enabled"})
        if unknown:
            raise ConfigError(f"scene: unknown key(s) {unknown}; expected {sorted(known | {'enabled'})}")
        return cls(**{k: v for k, v in node.items() if k in known})


@dataclass(frozen=True)
class Frame:
    """One row of a sequence manifest."""

    path: Path
    site: str
    order: str
    line: int  # the CSV line, for error messages


def _order_key(values: list[str], source: Path, column: str) -> list[Any]:
    """Numbers when every value of the column parses as one (1, 2, 10 in that order), else the text (ISO dates
    sort as text)."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return values
    if any(math.isnan(v) for v in numbers):
        raise DataError(f"{source}: column {column!r} holds NaN; expected an order or timestamp")
    return numbers


def read_sequence(source: str | Path, settings: SceneSettings) -> list[Frame]:
    """The frames of a CSV manifest, grouped by site (in the order sites first appear) and sorted by the order column
    within each site (ties keep the file's order). Relative paths are read from the CSV's folder.

    Raises:
        DataError: not a CSV, a column missing, an empty site or order value, or no rows.
    """
    source = Path(source).expanduser()
    if not (source.is_file() and source.suffix.lower() == ".csv"):
        raise DataError(f"input {source}: scene.enabled=true needs a CSV manifest with the columns "
                        f"{settings.path_column!r}, {settings.site_column!r} and {settings.order_column!r}")
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        columns = (settings.path_column, settings.site_column, settings.order_column)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"input CSV {source} lacks the column(s) {missing} (scene.path_column / site_column / "
                            f"order_column); it has {reader.fieldnames}")
        frames = []
        for line, row in enumerate(reader, start=2):
            values = [(row[c] or "").strip() for c in columns]
            empty = [c for c, v in zip(columns, values, strict=True) if not v]
            if empty:
                raise DataError(f"{source} line {line}: empty {empty}")
            path = Path(values[0])
            frames.append(Frame(path if path.is_absolute() else source.parent / path, values[1], values[2], line))
    if not frames:
        raise DataError(f"input CSV {source} lists no images")
    keys = _order_key([fr.order for fr in frames], source, settings.order_column)
    first_seen: dict[str, int] = {}
    for i, fr in enumerate(frames):
        first_seen.setdefault(fr.site, i)
    ranked = sorted(range(len(frames)), key=lambda i: (first_seen[frames[i].site], keys[i], i))
    return [frames[i] for i in ranked]


@dataclass
class _SiteState:
    signature: np.ndarray
    index: int  # the processed frame whose prediction is reused
    skips: int = 0


@dataclass
class ChangeGate:
    """Decides, frame by frame, whether to run the model: per-site state of the last processed image.

    ``decide(site, sig)`` returns None (process this frame) or the index of the processed frame to reuse. Frames are
    numbered in the order ``decide`` sees them.
    """

    threshold: float = DEFAULT_THRESHOLD
    max_skips: int = DEFAULT_MAX_SKIPS
    sites: dict[str, _SiteState] = field(default_factory=dict)
    # per frame, its distance to its site's last processed frame (None for a site's first frame)
    changes: list[float | None] = field(default_factory=list)

    def decide(self, site: str, sig: np.ndarray, trusted: Callable[[int], bool] | None = None) -> int | None:
        """``trusted(index)``: whether that processed frame's prediction may be reused (asked only when the distance
        and ``max_skips`` would reuse it); None trusts every one."""
        index = len(self.changes)
        state = self.sites.get(site)
        d = None if state is None else distance(sig, state.signature)
        self.changes.append(d)
        if state is not None and d < self.threshold and state.skips < self.max_skips \
                and (trusted is None or trusted(state.index)):
            state.skips += 1
            return state.index
        self.sites[site] = _SiteState(sig, index)
        return None


def scene_summary(reused: Sequence[int | None], gate_seconds: float, model_seconds: float,
                  n_model: int) -> dict[str, Any]:
    """Fraction skipped and time saved: the model time the skipped frames would have cost (at the measured seconds
    per processed frame) against what the change tests cost on every frame."""
    n = len(reused)
    skipped = sum(r is not None for r in reused)
    per_frame = model_seconds / n_model if n_model else float("nan")
    avoided = per_frame * skipped if n_model else 0.0
    return {"frames": n, "processed": n - skipped, "skipped": skipped,
            "skipped_fraction": skipped / n if n else 0.0,
            "model_seconds": model_seconds, "model_ms_per_frame": 1000 * per_frame if n_model else None,
            "change_test_seconds": gate_seconds,
            "change_test_ms_per_frame": 1000 * gate_seconds / n if n else None,
            "model_seconds_avoided": avoided, "seconds_saved": avoided - gate_seconds}


def scene_warnings(summary: dict[str, Any], min_agreement: float = DEFAULT_MIN_AGREEMENT) -> list[str]:
    """What a user must hear about a scene-gated run: the gate cost more time than it saved, or (with ``verify``)
    reused predictions agree with the model less than ``min_agreement``. Each names the settings to change."""
    out = []
    if summary.get("frames") and summary["seconds_saved"] < 0:
        refused = summary.get("processed_for_low_confidence", 0)
        why = (f"; {refused} reuse(s) were refused because the model was unsure (min_confidence="
               f"{summary.get('min_confidence')})" if refused else "")
        out.append(f"the scene gate cost {summary['change_test_seconds']:.3f} s and saved "
                   f"{summary['model_seconds_avoided']:.3f} s of model time: {summary['skipped']} of "
                   f"{summary['frames']} frames reused{why}. On this data it does not pay: turn it off "
                   f"(scene.enabled=false), or raise scene.threshold after checking with scene.verify=true")
    agree = (summary.get("verify") or {}).get("agreement")
    if agree is not None and agree < min_agreement:
        out.append(f"reused predictions agree with the model's own on {agree:.3f} of the reused frames, under "
                   f"scene.min_agreement={min_agreement}: lower scene.threshold or raise scene.min_confidence")
    return out


def agreement(reused: Sequence[int | None], predicted: np.ndarray, full: np.ndarray,
              classification: bool) -> dict[str, Any]:
    """Reused predictions against the model's own on the same frames (``scene.verify``).

    Args:
        reused: per frame, the index of the frame whose prediction it got, or None when processed.
        predicted: per frame, the prediction written (class index, or value for regression).
        full: per frame, the model's prediction on that frame itself.
    """
    idx = np.array([i for i, r in enumerate(reused) if r is not None], dtype=np.int64)
    if classification:
        same = predicted[idx] == full[idx] if len(idx) else np.zeros(0, bool)
        return {"verified": int(len(idx)), "agreement": float(same.mean()) if len(idx) else None,
                "disagreements": int((~same).sum())}
    diff = np.abs(predicted[idx] - full[idx]) if len(idx) else np.zeros(0)
    return {"verified": int(len(idx)), "mean_abs_diff": float(diff.mean()) if len(idx) else None,
            "max_abs_diff": float(diff.max()) if len(idx) else None}
