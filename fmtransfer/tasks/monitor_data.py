"""What ``monitor``'s ``reference=`` and ``current=`` name: a recipe and split, an image folder, a CSV of images, or
(the reference only) stored statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmtransfer.config import compose_stage, to_plain
from fmtransfer.data.recipe import SPLITS
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.tasks.model_outputs import ALL_ROWS, ModelRunner


@dataclass
class DataRef:
    """A resolved ``reference=`` / ``current=``: a recipe node and split, or stored statistics (``stats``)."""

    text: str
    recipe: dict[str, Any] | None = None
    split: str = ALL_ROWS
    stats: Path | None = None
    csv: Path | None = None  # the CSV an order column is read from

    @property
    def label(self) -> str:
        if self.stats is not None:
            return f"stored statistics {self.stats}"
        return f"{self.recipe['name']}/{self.split}"


def resolve_data(value: Any, key: str, default_split: str, runner: ModelRunner) -> DataRef:
    """``<recipe>[/<split>]``, a recipe node, an image folder, a CSV, or (``reference`` only) a stored .json."""
    if value is None or str(value).strip() == "":
        raise ConfigError(f"pass {key}=<recipe>[/<split>], an image folder or a CSV")
    if not isinstance(value, str):  # a recipe node (e.g. data@current=... in a config of one's own)
        node = to_plain(value)
        return DataRef(node.get("name", key), node, default_split, csv=_csv_of(node))
    path = Path(value).expanduser()
    if path.exists():
        if path.is_dir():
            return DataRef(value, _folder_recipe(path, runner), ALL_ROWS)
        if path.suffix.lower() == ".csv":
            return DataRef(value, _csv_recipe(path, runner), ALL_ROWS, csv=path)
        if path.suffix.lower() in (".json", ".npz"):
            if key != "reference":
                raise ConfigError(f"{key}={value}: stored statistics stand for the reference only; the current "
                                  f"data is a recipe, an image folder or a CSV")
            return DataRef(value, stats=path)
        raise ConfigError(f"{key}={value} is a file, but neither a .csv of images nor stored statistics (.json)")
    name, _, split = value.partition("/")
    split = split or default_split
    if split not in (*SPLITS, ALL_ROWS):
        raise ConfigError(f"{key}={value}: split {split!r} is not one of {', '.join((*SPLITS, ALL_ROWS))} (and no "
                          f"file or folder of that name exists)")
    try:
        node = to_plain(compose_stage("evaluate", [f"data={name}"]).data)
    except Exception as e:  # noqa: BLE001 - Hydra names the missing option itself
        raise ConfigError(f"{key}={value}: no data recipe {name!r} and no such file or folder "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return DataRef(value, node, split, csv=_csv_of(node))


def _csv_of(node: dict[str, Any]) -> Path | None:
    source = node.get("source") or {}
    return Path(source["path"]).expanduser() if source.get("kind") == "csv_manifest" else None


def _model_image(runner: ModelRunner) -> dict[str, Any]:
    pre = runner.identity["preprocessing"]
    return {"image_size": list(pre["image_size"]), "channels": int(pre["channels"]), "mean": list(pre["mean"]),
            "std": list(pre["std"])}


def _folder_recipe(path: Path, runner: ModelRunner) -> dict[str, Any]:
    if not any(p.is_file() for p in path.rglob("*")):
        raise DataError(f"current={path}: the folder is empty (no images to monitor)")
    return {"name": path.name or "folder", "source": {"kind": "image_folder", "root": str(path)},
            **_model_image(runner)}


def _csv_recipe(path: Path, runner: ModelRunner) -> dict[str, Any]:
    return {"name": path.stem, "source": {"kind": "csv_manifest", "path": str(path)}, **_model_image(runner)}
