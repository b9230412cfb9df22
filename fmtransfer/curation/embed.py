"""Embeddings of a split to a memory-mapped ``.npy`` with an id list, in shards that survive interruption."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.errors import ConfigError, DataError
from fmtransfer.lineage.io import atomic_path, sha256_bytes, write_json_atomic, write_text_atomic
from fmtransfer.models import inference
from fmtransfer.ranks import environment_layout

log = logging.getLogger(__name__)
EMBEDDINGS, IDS, PROGRESS = "embeddings.npy", "embeddings.ids.txt", "embeddings.shards.json"
SHARD_STATE = "state.json"  # in each shard folder: what its shards were made from


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


def _shard_name(s: int) -> str:
    return f"shard_{s:05d}.npy"


def _wait_for_shards(shard_dir: Path, n_shards: int, world_size: int, wait_s: float, poll_s: float,
                     report_s: float = 60.0) -> None:
    """Rank 0: wait until every shard file exists, logging which are present when that changes (and every
    ``report_s``); give up after ``wait_s`` seconds in which no new shard appeared.

    Raises:
        DataError: the timeout, naming the missing shards, the ranks that own them and the environment's layout.
    """
    last_new = last_report = time.monotonic()
    seen = -1
    while missing := [s for s in range(n_shards) if not (shard_dir / _shard_name(s)).is_file()]:
        now = time.monotonic()
        owners = sorted({s % world_size for s in missing})
        if n_shards - len(missing) != seen or now - last_report >= report_s:
            if n_shards - len(missing) != seen:
                last_new = now
            seen, last_report = n_shards - len(missing), now
            log.info(f"rank 0 of {world_size}: {seen} of {n_shards} shards present; waiting for "
                     f"{_shard_list(missing)} from rank(s) {owners} ({shard_dir})")
        if now - last_new > wait_s:
            raise DataError(f"{shard_dir}: {len(missing)} of {n_shards} shards {_shard_list(missing)} were not "
                            f"written by rank(s) {owners} within {wait_s:g} s (curation.embed.wait_s) of the last "
                            f"new shard; {environment_layout()} from the environment: start those ranks "
                            f"(resume= keeps the finished shards) or unset RANK / WORLD_SIZE for one process")
        time.sleep(poll_s)


def _shard_list(shards: list[int], shown: int = 8) -> str:
    more = f" and {len(shards) - shown} more" if len(shards) > shown else ""
    return f"{shards[:shown]}{more}"


def _finished(folder: Path, state: dict[str, Any], ids: list[str], n_shards: int) -> bool:
    """Whether ``folder`` holds the whole embedding of ``ids`` made as ``state`` says."""
    progress, npy, ids_file = folder / PROGRESS, folder / EMBEDDINGS, folder / IDS
    if not (progress.is_file() and npy.is_file() and ids_file.is_file()):
        return False
    old = _read_json(progress)
    return ({k: old.get(k) for k in state} == state and old.get("done") == list(range(n_shards))
            and read_ids(ids_file) == ids)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content (a hard link where the file system allows: the files are never changed in
    place, only replaced, so the earlier run's copy stays as it is)."""
    try:
        with atomic_path(dst) as tmp:
            tmp.unlink()
            os.link(src, tmp)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def _reuse(src: Path, folder: Path, state: dict[str, Any], ids: list[str], n_shards: int, key: str) -> None:
    """Bring what ``src`` (an earlier run's embeddings folder) holds of this embedding into ``folder``: its finished
    embedding, or its finished shards.

    Raises:
        ConfigError: ``src`` holds embeddings of other inputs (another model's weights or preprocessing, other ids,
            width, dtype or shard size), named with their differing keys, or nothing this run could continue.
    """
    if _finished(src, state, ids, n_shards):
        if src.resolve() != folder.resolve():
            for name in (EMBEDDINGS, IDS, PROGRESS):
                _link_or_copy(src / name, folder / name)
        return
    shards = src / f"shards-{key}"
    if shards.is_dir() and _read_json(shards / SHARD_STATE) == state:
        if src.resolve() != folder.resolve():
            (folder / shards.name).mkdir(exist_ok=True)
            for path in sorted(shards.glob("*")):
                _link_or_copy(path, folder / shards.name / path.name)
        return
    made = [_read_json(src / PROGRESS)] if (src / PROGRESS).is_file() else []
    made += [_read_json(p) for p in sorted(src.glob(f"shards-*/{SHARD_STATE}"))]
    if not made:
        raise ConfigError(f"{src}: no embeddings or shards there that record what they were made from; nothing "
                          f"to continue (drop resume= to embed afresh)")
    here = _flat(state)
    there = _flat({k: v for k, v in made[0].items() if k in state})
    differ = sorted(k for k in here.keys() | there.keys() if here.get(k) != there.get(k)) or ["ids"]
    shown = "; ".join(f"{k}={there.get(k, '(absent)')!r} there, {here.get(k, '(absent)')!r} here" for k in differ)
    raise ConfigError(f"{src} holds embeddings of other inputs ({shown}); reusing them would record this run's "
                      f"base for another model's embeddings: drop resume= to embed afresh, or resume the run "
                      f"with the base and data it used")


def embed_split(model, dm, split: str, folder: str | Path, *, dtype: str = "float32", shard_size: int = 65536,
                accelerator: str = "auto", rank: int = 0, world_size: int = 1, wait_s: float = 3600.0,
                poll_s: float = 2.0, identity: dict[str, Any] | None = None,
                reuse: str | Path | None = None) -> tuple[Path | None, list[str]]:
    """Embed every sample of ``split`` with ``model.features`` into ``folder/embeddings.npy`` (rows in split
    order) and ``embeddings.ids.txt``.

    The rows are cut into shards of ``shard_size``; shard s belongs to rank ``s % world_size``, which writes it to
    its own file ``shards-<key>/shard_<s>.npy`` (atomically; the key changes with the model's ``identity`` (its
    weights' sha256 and preprocessing), the ids, width, dtype and shard size, so stale shards never mix in, and
    ``state.json`` beside the shards says what they were made from). A shard file that exists is never
    recomputed, so an interrupted run resumes where it stopped. Rank 0 then waits for every shard (giving up after
    ``wait_s`` without a new one), assembles the memory-mapped ``embeddings.npy`` (atomically), records it in
    ``embeddings.shards.json`` and removes the shard files.

    Args:
        identity: what the model is (weights' sha256, adapter, preprocessing); part of every key.
        reuse: an earlier run's embeddings folder to continue from (``resume=``): its finished embedding or shards
            of the same inputs are brought into ``folder``; embeddings of other inputs are refused.

    Returns:
        (the .npy path, the ids) on rank 0; (None, the ids) on the other ranks once their shards are written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = dm.prepare()
    rows = dm.rows(split)
    ids = [str(i) for i in table.ids[rows]]
    if len(rows) == 0:
        raise DataError(f"recipe {dm.recipe.name!r} has no samples in split {split!r} to embed")
    dim, size = int(model.embed_dim), int(shard_size)
    n_shards = -(-len(rows) // size)
    npy = folder / EMBEDDINGS
    # as it reads back from the JSON files it is compared with (tuples become lists)
    state = json.loads(json.dumps({"ids": len(ids), "dim": dim, "dtype": dtype, "shard_size": size,
                                   "model": identity or {}}))
    key = sha256_bytes(json.dumps(state, sort_keys=True).encode() + "\n".join(ids).encode())[:12]
    if reuse is not None:
        _reuse(Path(reuse), folder, state, ids, n_shards, key)
    if _finished(folder, state, ids, n_shards):
        return (npy if rank == 0 else None), ids
    shard_dir = folder / f"shards-{key}"
    shard_dir.mkdir(exist_ok=True)
    if rank == 0 and not (shard_dir / SHARD_STATE).is_file():
        write_json_atomic(shard_dir / SHARD_STATE, state)
    device = int(os.environ.get("LOCAL_RANK", rank)) if world_size > 1 else None
    try:
        for s in range(rank, n_shards, world_size):
            if (shard_dir / _shard_name(s)).is_file():
                continue
            dm.use_rows(split, rows[s * size:(s + 1) * size])
            part = inference.embed(model, dm.dataloader(split), accelerator, device=device).astype(dtype)
            with atomic_path(shard_dir / _shard_name(s)) as tmp, open(tmp, "wb") as fh:
                np.save(fh, part)
    finally:
        dm.use_rows(split, rows)
    if rank != 0:
        return None, ids
    _wait_for_shards(shard_dir, n_shards, world_size, wait_s, poll_s)
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(len(ids), dim))
        for s in range(n_shards):
            out[s * size:(s + 1) * size] = np.load(shard_dir / _shard_name(s))
        out.flush()
        del out
    write_text_atomic(folder / IDS, "".join(f"{i}\n" for i in ids))
    write_json_atomic(folder / PROGRESS, {**state, "done": list(range(n_shards)), "world_size": world_size})
    shutil.rmtree(shard_dir, ignore_errors=True)
    return npy, ids
