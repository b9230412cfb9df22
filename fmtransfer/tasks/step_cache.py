"""Rerun only what changed: a pipeline step is reused when the content hash of its inputs is one it has finished
before.

A step's key is the sha256 of: its stage and resolved config (its own ``run_dir`` left out), what the earlier steps
whose folders its config names have made (a model, a manifest, an adapter: the digests of their outputs, so a step
that ran again and made other bytes makes every step that reads it run again), the content fingerprint of every data recipe in its config (the sample table's: ids,
labels, splits and every image's bytes), and the code version (every source and config file of the package). A
finished step is indexed under ``<cache>/steps/<key>.json`` with its result; a later pipeline with the same key
links that run dir into its own folder instead of running the stage, after checking that its run ended ok and that
every output still has the sha256 its run.json recorded. ``pipeline rerun=[<step>, ...]`` (or ``[all]``) runs
steps again anyway, and ``reuse=false`` turns reuse off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fmtransfer.errors import ArtifactError
from fmtransfer.lineage import write_json_atomic
from fmtransfer.lineage.io import canonical_json
from fmtransfer.lineage.record import load_record, verify_record
from fmtransfer.paths import cache_dir
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
FORMAT = 1


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over every .py and .yaml file of the installed package (path and bytes): any code change counts."""
    digest = hashlib.sha256()
    for path in sorted(p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()
                       and "__pycache__" not in p.parts):
        digest.update(path.relative_to(PACKAGE).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def index_dir() -> Path | None:
    """``$FMTRANSFER_CACHE/steps`` (default ``~/.cache/fmtransfer/steps``); None when the cache is switched off."""
    cache = cache_dir()
    return cache / "steps" if cache is not None else None


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _recipes(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every data recipe node in a config (a mapping with ``name`` and a ``source`` mapping), with its key path."""
    if isinstance(node, Mapping):
        if isinstance(node.get("source"), Mapping) and "name" in node:
            yield where or ".", dict(node)
            return
        for key, value in node.items():
            yield from _recipes(value, f"{where}.{key}" if where else str(key))


def data_fingerprints(config: Mapping[str, Any], memo: dict[bytes, str] | None = None) -> dict[str, str]:
    """The content fingerprint of every data recipe the config holds.

    Args:
        memo: fingerprints already taken in this pipeline run, by recipe node: the scan cache makes an image folder's
            repeat cheap, but an npz or a package's data would be read and hashed again for every step.
    """
    from fmtransfer.data import build_table, load_recipe

    memo = {} if memo is None else memo
    out = {}
    for where, node in _recipes(config):
        ident = canonical_json(node)
        if ident not in memo:
            memo[ident] = build_table(load_recipe(node)).fingerprint
        out[where] = memo[ident]
    return out


def _roots(folders: Sequence[Path | str]) -> list[str]:
    """A step's folder as the strings a config may name it by: as given and resolved (a reused step is a link)."""
    out = []
    for folder in folders:
        for path in (str(folder), str(Path(folder).resolve())):
            if path not in out:
                out.append(path)
    return out


def _replace(node: Any, replacements: list[tuple[str, str]]) -> Any:
    """``node`` with every string that starts with a folder of ``replacements`` rewritten to its placeholder."""
    if isinstance(node, Mapping):
        return {k: _replace(v, replacements) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, replacements) for v in node]
    if isinstance(node, str):
        for root, placeholder in replacements:
            if node == root or node.startswith(root + os.sep):
                return placeholder + node[len(root):]
    return node


def _names(text: str, root: str) -> bool:
    """Whether ``text`` names the folder ``root``, a file inside it, or a folder that holds it (``plan`` reads the
    folder of every adapt step)."""
    return text == root or text.startswith(root + os.sep) or (text.startswith(os.sep) and
                                                               root.startswith(text.rstrip(os.sep) + os.sep))


def parents_of(config: Mapping[str, Any], folders: Mapping[str, Sequence[Path | str]]) -> list[str]:
    """The earlier steps whose folders the config names (``folders``: step name -> its folders), sorted."""
    found = set()
    for text in _strings(config):
        for name, paths in folders.items():
            if any(_names(text, root) for root in _roots(paths)):
                found.add(name)
    return sorted(found)


def step_key(sub: DictConfig, keys: Mapping[str, str], folders: Mapping[str, Sequence[Path | str]],
             base: Path | None = None, memo: dict[bytes, str] | None = None) -> tuple[str, dict[str, Any]]:
    """The step's key and what went into it (for the log and for a person asking why a step ran again).

    Paths do not count, content does: the step's own run dir becomes ``{run_dir}`` and an earlier step's folder
    ``{step:<name>}`` (that step's key stands for what is in it), so the same pipeline in another run dir has the
    same keys.

    Args:
        sub: the step's composed config, with what earlier steps produced already merged in.
        keys: what earlier steps made (:func:`made`) by name. folders: earlier steps' folders by name (its folder in this pipeline,
            and the reused run dir it links to).
        base: the pipeline's run dir (``{pipeline}``: a folder of several steps, such as the adapt sweep's).
        memo: the run's data fingerprints so far (:func:`data_fingerprints`).
    """
    config = OmegaConf.to_container(sub, resolve=True)
    own = config.pop("run_dir", None)
    parents = parents_of(config, folders)
    replacements = [(root, f"{{step:{name}}}") for name in parents for root in _roots(folders[name])]
    replacements += [(root, "{run_dir}") for root in (_roots([own]) if own else [])]
    replacements += [(root, "{pipeline}") for root in (_roots([base]) if base else [])]
    replacements.sort(key=lambda pair: -len(pair[0]))  # the longest folder first: a step inside another's folder
    inputs = {"format": FORMAT, "stage": config.get("stage"), "config": _replace(config, replacements),
              "parents": {name: keys[name] for name in parents}, "data": data_fingerprints(config, memo),
              "code": code_version()}
    return hashlib.sha256(canonical_json(inputs)).hexdigest(), inputs


def made(run_dir: Path) -> str:
    """What a finished step made, as one digest: the sha256 of its run.json's outputs (role and file digest).
    A later step's key holds this, not the earlier step's key: a step run again that makes other bytes (a GPU run,
    a changed code path) makes its readers run again, and one that makes the same bytes does not."""
    try:
        record = load_record(run_dir)
    except ArtifactError:  # no run record to vouch for its outputs: what reads them always runs
        return uuid.uuid4().hex
    outputs = sorted((o["role"], Path(o["path"]).name, o["sha256"]) for o in record["outputs"])
    return hashlib.sha256(canonical_json(outputs)).hexdigest()


ITEMS = "__items__"  # a mapping whose keys are not all strings (plan's curves by calibration size), as pairs


def _encode(value: Any) -> Any:
    """JSON keeps only string keys: a mapping with others is stored as its pairs, so a reused result reads as the
    one the step returned."""
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {ITEMS: [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {ITEMS}:
            return {_decode(k): _decode(v) for k, v in value[ITEMS]}
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _result_json(result: StageResult) -> dict[str, Any]:
    return {"stage": result.stage, "run_dir": str(Path(result.run_dir).resolve()), "metrics": _encode(result.metrics),
            "outputs": {k: str(Path(v).resolve()) for k, v in result.outputs.items()},
            "sections": [list(s) for s in result.sections]}


def _result_from(entry: dict[str, Any]) -> StageResult:
    return StageResult(entry["stage"], Path(entry["run_dir"]), _decode(entry["metrics"]),
                       {k: Path(v) for k, v in entry["outputs"].items()}, [tuple(s) for s in entry["sections"]])


def remember(key: str, inputs: dict[str, Any], result: StageResult) -> None:
    """Index a finished step under its key (atomically); an unwritable cache only warns."""
    folder = index_dir()
    if folder is None:
        return
    entry = {"key": key, "inputs": {k: v for k, v in inputs.items() if k != "config"},
             "result": _result_json(result)}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"{key}.json", entry)
    except OSError as e:
        log.warning("pipeline: step cache %s not written (%s); this step will run again next time", folder, e)


def recall(key: str) -> StageResult | None:
    """The result of a finished step with this key, when its run ended ok and every output is unchanged; else None
    (with the reason in the log when an entry existed)."""
    folder = index_dir()
    path = folder / f"{key}.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        result = _result_from(entry["result"])
        record = load_record(result.run_dir)
    except Exception as e:  # noqa: BLE001 - a broken entry or a removed run dir: run the step again
        log.info("pipeline: cached step %s not usable (%s: %s); running it again", key[:12], type(e).__name__, e)
        return None
    problems = [] if record.get("status") == "ok" else [f"its run ended {record.get('status')!r}"]
    problems += verify_record(result.run_dir) if not problems else []
    problems += [f"{p}: missing" for p in result.outputs.values() if not Path(p).exists()]
    if problems:
        log.warning("pipeline: the earlier run %s of this step cannot be reused (%s); running it again",
                    result.run_dir, "; ".join(problems[:3]))
        return None
    return result


def link(target: Path, run_dir: Path) -> None:
    """``target`` (this pipeline's folder for the step) becomes a link to the reused ``run_dir``."""
    if target.resolve() == Path(run_dir).resolve():
        return
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        raise FileExistsError(f"{target} exists and is not the reused run {run_dir}")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(Path(run_dir).resolve(), target, target_is_directory=True)
