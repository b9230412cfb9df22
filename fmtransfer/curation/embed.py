"""Embeddings of a split to a memory-mapped ``.npy`` with an id list, in shards that survive interruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fmtransfer.errors import DataError
from fmtransfer.lineage.io import write_json_atomic, write_text_atomic

EMBEDDINGS, IDS, PROGRESS = "embeddings.npy", "embeddings.ids.txt", "embeddings.shards.json"


def read_ids(path: Path) -> list[str]:
    return path.read_text().splitlines()


def load_embeddings(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """A ``.npy`` (memory-mapped, not read) and its id list ``<stem>.ids.txt`` beside it.

    Raises:
        DataError: missing files, not a 2-D array, or a row count that disagrees with the id list.
    """
    path = Path(path).expanduser()
    ids_path = path.with_name(path.name.removesuffix(".npy") + ".ids.txt")
    if not path.is_file():
        raise DataError(f"embeddings {path} do not exist")
    if not ids_path.is_file():
        raise DataError(f"embeddings {path} have no id list {ids_path} (one id per line)")
    try:
        x = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable .npy array ({e})") from e
    ids = read_ids(ids_path)
    if x.ndim != 2:
        raise DataError(f"embeddings {path} have shape {x.shape}; expected (n, d)")
    if len(ids) != len(x):
        raise DataError(f"embeddings {path} have {len(x)} rows but {ids_path} lists {len(ids)} ids")
    return x, ids


def embed_split(model, dm, split: str, folder: str | Path, *, dtype: str = "float32", shard_size: int = 65536,
                accelerator: str = "auto") -> tuple[Path, list[str]]:
    """Embed every sample of ``split`` with ``model.features`` into ``folder/embeddings.npy`` (rows in split
    order) and ``embeddings.ids.txt``.

    Shards of ``shard_size`` rows are computed one after another; a finished shard is recorded in
    ``embeddings.shards.json`` and skipped when the same folder is embedded again (same ids, dtype and width).

    Returns:
        (the .npy path, the ids).
    """
    from fmtransfer.tasks.common import embed

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = dm.prepare()
    rows = dm.rows(split)
    ids = [str(i) for i in table.ids[rows]]
    if len(rows) == 0:
        raise DataError(f"recipe {dm.recipe.name!r} has no samples in split {split!r} to embed")
    dim = int(model.embed_dim)
    npy, ids_file, progress_file = folder / EMBEDDINGS, folder / IDS, folder / PROGRESS
    state = {"ids": len(ids), "dim": dim, "dtype": dtype, "shard_size": int(shard_size), "done": []}
    if progress_file.is_file() and npy.is_file() and ids_file.is_file():
        old = json.loads(progress_file.read_text())
        if ({k: old.get(k) for k in ("ids", "dim", "dtype", "shard_size")}
                == {k: state[k] for k in ("ids", "dim", "dtype", "shard_size")} and read_ids(ids_file) == ids):
            state["done"] = list(old.get("done", []))
    if not state["done"]:
        write_text_atomic(ids_file, "".join(f"{i}\n" for i in ids))
        np.lib.format.open_memmap(npy, mode="w+", dtype=np.dtype(dtype), shape=(len(ids), dim)).flush()
        write_json_atomic(progress_file, state)
    out = np.lib.format.open_memmap(npy, mode="r+")
    try:
        for shard, start in enumerate(range(0, len(rows), int(shard_size))):
            if shard in state["done"]:
                continue
            dm.use_rows(split, rows[start:start + int(shard_size)])
            out[start:start + int(shard_size)] = embed(model, dm.dataloader(split), accelerator).astype(dtype)
            out.flush()
            state["done"].append(shard)
            write_json_atomic(progress_file, state)
    finally:
        dm.use_rows(split, rows)
        del out
    return npy, ids
