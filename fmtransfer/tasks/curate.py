"""``curate``: embed a split -> hierarchical k-means with resampling -> near-duplicate removal -> balanced
sampling -> ``curated.csv``, a manifest any recipe consumes as ``data.subset=<csv>``.

Writes into the run dir: ``embeddings/`` (memory-mapped .npy, id list, shard progress), ``curated.csv`` (id,
path, label, region, cluster at every level), ``duplicates.csv``, ``metrics.json``, ``curation.md``,
``cluster_sizes.png`` and ``pca.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fmtransfer.adapters.loading import allow_unfinished, load_model_or_adapted
from fmtransfer.config import build_dataclass, require, run_dir
from fmtransfer.curation.checks import self_checks, shares_markdown
from fmtransfer.curation.curate import Curation, CurationSettings, curate_embeddings, largest_share
from fmtransfer.curation.embed import embed_split, load_embeddings
from fmtransfer.data import RecipeDataModule, build_datamodule, load_recipe
from fmtransfer.data.sources import read_source
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.lineage import RunRecord, sha256_file, write_json_atomic, write_text_atomic
from fmtransfer.plots import cluster_sizes_png, pca_map_png
from fmtransfer.ranks import environment_layout, rank_and_world
from fmtransfer.tasks.common import record_sources
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)
_STAGE_KEYS = ("split", "embed", "embeddings")


def curation_settings(cfg: DictConfig) -> CurationSettings:
    values = {k: v for k, v in OmegaConf.to_container(cfg.curation, resolve=True).items() if k not in _STAGE_KEYS}
    return build_dataclass(CurationSettings, values, "curation")


def _pool_embeddings(cfg: DictConfig, record: RunRecord, out: Path, recipe,
                     world: int = 1) -> tuple[np.ndarray, np.ndarray, Any]:
    """The split's embeddings (computed, resumed or precomputed), the table rows they belong to, and the table."""
    split = cfg.curation.split
    if cfg.curation.embeddings:
        table = build_datamodule(recipe, cfg.loader, output_dir=out, require_labels=False).prepare()
        x, ids = load_embeddings(cfg.curation.embeddings)
        record.add_input(cfg.curation.embeddings, "embeddings")
        index = {str(i): r for r, i in enumerate(table.ids)}
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise DataError(f"embeddings {cfg.curation.embeddings}: {len(unknown)} ids are not in recipe "
                            f"{recipe.name!r}, e.g. {unknown[:3]}")
        rows = np.array([index[i] for i in ids], dtype=np.int64)
        return x, rows, table
    npy, dm = _embed(cfg, out, recipe, record, 0, world)
    return np.load(npy, mmap_mode="r"), dm.rows(split), dm.prepare()  # the table embed_split already read


def _embed(cfg: DictConfig, out: Path, recipe, record: RunRecord | None, rank: int = 0,
           world: int = 1) -> tuple[Path | None, RecipeDataModule]:
    """Embed the split with ``base`` (this rank's shards; rank 0 assembles); ``record`` is None off rank 0.
    Returns the .npy (None off rank 0) and the datamodule whose table the embedding read."""
    if not cfg.base:
        raise ConfigError("pass base=<model run dir or checkpoint> (its backbone embeds the data) "
                          "or curation.embeddings=<file.npy>")
    loaded = load_model_or_adapted(cfg.base, allow_unfinished=allow_unfinished(cfg))
    # curation balances by cluster, not by label: an unlabelled pool is what it exists to feed to self-supervised
    # pretraining
    dm = build_datamodule(recipe, cfg.loader, model_meta=loaded.meta, output_dir=out, require_labels=False)
    reuse = None
    if cfg.resume:  # read from there, written here: the earlier run's files and record stay as they were
        reuse = Path(cfg.resume).expanduser() / "embeddings"
        if not reuse.is_dir():
            raise ConfigError(f"resume={cfg.resume}: no embeddings/ folder there to continue")
    if record is not None:
        record_sources(record, loaded)
        if cfg.resume:
            record.add_parent(Path(cfg.resume))
    try:
        npy, _ = embed_split(loaded.model, dm, cfg.curation.split, out / "embeddings",
                             dtype=cfg.curation.embed.dtype, shard_size=int(cfg.curation.embed.shard_size),
                             accelerator=cfg.accelerator, rank=rank, world_size=world,
                             wait_s=float(cfg.curation.embed.wait_s), identity=_identity(loaded), reuse=reuse)
    except ConfigError as e:  # embeddings of other inputs in the resumed run: name the key that pointed there
        if reuse is None:
            raise
        raise ConfigError(f"resume={cfg.resume}: {e}") from None
    if record is not None:
        record.add_output(npy, "embeddings")
    return npy, dm


def _identity(loaded) -> dict[str, Any]:
    """What the embedding model is: its weights, the adapter applied to them, and the preprocessing the data is
    read with; embeddings and shards made by another model are never taken for this one's."""
    adapter = loaded.adapter
    return {"weights_sha256": loaded.base_meta["weights_sha256"],
            "adapter_sha256": sha256_file(adapter["path"]) if adapter is not None else None,
            "preprocess": loaded.meta["preprocess"]}


def _check_strata(settings: CurationSettings, recipe) -> None:
    """``stratify_by=label`` needs labels: refused for an unlabelled source before the base is loaded (listing the
    source says so without decoding an image)."""
    if settings.stratify_by != "label":
        return
    unlabelled = read_source(recipe).unlabelled
    if unlabelled:
        raise ConfigError(f"curation.stratify_by=label, but data recipe {recipe.name!r} has no labels: {unlabelled}; "
                          f"set curation.stratify_by=null (balanced by cluster only) or region")


def curate(cfg: DictConfig) -> StageResult:
    """Curate ``cfg.curation.split`` of ``cfg.data``; see the module docstring.

    The result's outputs include ``manifest`` (curated.csv), ``cluster_sizes`` and ``pca``; off rank 0 its metrics
    are only ``rank`` and ``embedded``.
    """
    require(cfg, "seed", "base", "resume", "accelerator", "data", "loader", "curation")
    allow_unfinished(cfg)
    out = run_dir(cfg)
    settings = curation_settings(cfg)
    if cfg.curation.embed.dtype not in ("float32", "float16"):
        raise ConfigError(f"curation.embed.dtype={cfg.curation.embed.dtype!r}: choose float32 or float16")
    recipe = load_recipe(cfg.data)
    _check_strata(settings, recipe)
    rank, world = rank_and_world()
    if world > 1:  # said out loud: the environment, not the command line, switched this on
        role = "then assembles every shard and curates" if rank == 0 else "then stops; rank 0 curates"
        log.warning(f"{environment_layout()} from the environment: this process embeds shard {rank} of every "
                    f"{world} ({rank}, {rank + world}, ...) of {cfg.curation.split!r}, {role}")
    if rank != 0:  # one of several processes (torchrun / DDP launcher): embed this rank's shards, then stop
        if cfg.curation.embeddings:
            return StageResult("curate", out, {"rank": rank, "embedded": False})
        _embed(cfg, out, recipe, None, rank, world)
        log.info(f"rank {rank} of {world}: shards written; rank 0 assembles them and curates")
        return StageResult("curate", out, {"rank": rank, "embedded": True})
    with RunRecord("curate", out, cfg) as record:
        x, rows, table = _pool_embeddings(cfg, record, out, recipe, world)
        record.set_data(recipe.name, recipe.to_dict(), table.fingerprint)
        strata = _strata(settings, table, rows)
        result = curate_embeddings(x, settings, strata=strata, seed=int(cfg.seed), log=log.info)
        files = _write_outputs(out, result, x, rows, table, settings)
        metrics = _metrics(result, rows, table, settings, recipe.name, cfg.curation.split)
        for warning in metrics["self_checks"]["warnings"]:
            log.warning("curation self-check: %s", warning)
        write_json_atomic(out / "metrics.json", metrics)
        summary = _summary(metrics)
        files["report"] = write_text_atomic(out / "curation.md", _report(metrics, summary, files))
        files["metrics"] = out / "metrics.json"
        for role, path in files.items():
            record.add_output(path, role)
    return StageResult("curate", out, metrics, files, [("Data curation", summary)])


def _strata(settings: CurationSettings, table, rows: np.ndarray) -> np.ndarray | None:
    """Each pooled sample's stratum, by name: a class's name where the recipe names its classes (so that the log and
    the report say 'trouser', not '1'), else the label's value; a region's name; None without stratify_by."""
    if settings.stratify_by == "label":
        return np.asarray([_label(table, row) for row in rows])
    if settings.stratify_by == "region":
        return np.asarray(table.regions[rows]).astype(str)
    return None


def _label(table, row: int) -> str:
    if table.unlabelled:
        return ""
    t = table.targets[row]
    return table.classes[int(t)] if table.classes else f"{float(t):.6g}"


def _write_outputs(out: Path, result: Curation, x: np.ndarray, rows: np.ndarray, table,
                   settings: CurationSettings) -> dict[str, Path]:
    paths = result.tree.paths()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "path", "label", "region", *[f"cluster_{t}" for t in range(len(settings.levels))]])
    for i in result.selected:
        row = rows[i]
        w.writerow([table.ids[row], str(table.paths[row]) if table.paths is not None else "", _label(table, row),
                    table.regions[row], *paths[i].tolist()])
    files = {"manifest": write_text_atomic(out / "curated.csv", buf.getvalue())}
    dup = io.StringIO()
    dw = csv.writer(dup)
    dw.writerow(["id", "duplicate_of"])
    for i in np.flatnonzero(~result.kept):
        dw.writerow([table.ids[rows[i]], table.ids[rows[result.representative[i]]]])
    files["duplicates"] = write_text_atomic(out / "duplicates.csv", dup.getvalue())
    k0 = settings.levels[0]
    before = np.bincount(result.tree.labels, minlength=k0)
    after = np.bincount(result.tree.labels[result.selected], minlength=k0)
    files["cluster_sizes"] = cluster_sizes_png(before, after, out / "cluster_sizes.png",
                                               f"{k0} finest clusters: pool vs curated")
    rng = np.random.default_rng(0)
    shown = np.sort(rng.choice(len(x), size=min(len(x), 20000), replace=False))
    sample = np.asarray(x[shown], dtype=np.float32)
    sample -= sample.mean(0)
    _, _, vt = np.linalg.svd(sample, full_matrices=False)
    files["pca"] = pca_map_png(sample @ vt[:2].T, paths[shown, -1], np.isin(shown, result.selected), out / "pca.png",
                               f"PCA of the embeddings, coloured by the {settings.levels[-1]} top clusters")
    return files


def _metrics(result: Curation, rows: np.ndarray, table, settings: CurationSettings, recipe: str,
             split: str) -> dict[str, Any]:
    n = len(rows)
    k0 = settings.levels[0]
    labels = result.tree.labels
    per_class = None
    if table.classes:
        per_class = {c: {"pool": int((table.targets[rows] == i).sum()),
                         "curated": int((table.targets[rows[result.selected]] == i).sum())}
                     for i, c in enumerate(table.classes)}
    return {"stage": "curate", "recipe": recipe, "split": split, "labelled": not table.unlabelled,
            "pool": n, "selected": int(len(result.selected)),
            "fraction": len(result.selected) / n, "duplicates_removed": int((~result.kept).sum()),
            "duplicate_groups": int(len(np.unique(result.representative[~result.kept]))),
            "levels": settings.levels, "settings": dataclasses.asdict(settings),
            "largest_10pct_clusters_share": {"pool": largest_share(labels, k0),
                                             "curated": largest_share(labels[result.selected], k0)},
            "empty_clusters_after": int((np.bincount(labels[result.selected], minlength=k0) == 0).sum()),
            "dedup_threshold": result.dedup_threshold, "dedup_stats": result.dedup_stats,
            "per_class": per_class, "seconds": result.seconds, "strata_notes": result.notes,
            "self_checks": self_checks(_groups(result, rows, table), result.selected, result.kept, settings.checks)}


def _groups(result: Curation, rows: np.ndarray, table) -> dict[str, np.ndarray]:
    """What the self-checks compare: classes (labelled classification), regions (when there are several) and the
    top-level clusters (always: the only groups an unlabelled pool has)."""
    groups = {}
    if table.classes and not table.unlabelled:
        groups["class"] = np.asarray(table.classes, dtype=object)[table.targets[rows].astype(int)]
    regions = np.asarray(table.regions[rows]).astype(str)
    if len(np.unique(regions)) > 1:
        groups["region"] = regions
    groups["cluster"] = result.tree.paths()[:, -1]
    return groups


def _summary(m: dict[str, Any]) -> str:
    """What was kept, as markdown: the body of ``curation.md`` and the pipeline report's section."""
    share, checks = m["largest_10pct_clusters_share"], m["self_checks"]
    threshold = f" at cosine {m['dedup_threshold']:.4f}" if m["dedup_threshold"] is not None else ""
    lines = [f"{m['selected']} of {m['pool']} samples kept ({m['fraction']:.1%}); {m['duplicates_removed']} "
             f"near-duplicates ({checks['dedup_share']:.1%} of the pool) removed{threshold}, each within the threshold "
             f"of one of {m['duplicate_groups']} kept samples.", ""]
    stats = m.get("dedup_stats") or {}
    if stats and stats["removed_at_threshold"] > m["duplicates_removed"]:
        lines += [f"A near-duplicate must also stand out from its neighbourhood: within "
                  f"{m['settings']['dedup_relative']:g} of the distance to its {m['settings']['dedup_k']}th neighbour "
                  f"(`curation.dedup_relative`; the median sample's is at cosine {stats['scale']:.4f}). At the "
                  f"threshold alone {stats['removed_at_threshold']} samples "
                  f"({stats['removed_at_threshold'] / m['pool']:.1%}) would have gone: look-alikes the embedding crowds "
                  f"together, not copies.", ""]
    if m.get("strata_notes"):
        lines += [f"Stratified by {m['settings']['stratify_by']}:", "", *[f"- {n}" for n in m["strata_notes"]], ""]
    if checks["warnings"]:
        lines += ["**Self-check warnings**:", "", *[f"- {w}" for w in checks["warnings"]], ""]
    else:
        lines += ["Self-checks: no warning (dedup share, class and region shares within their limits).", ""]
    lines += [f"The largest 10% of the {m['levels'][0]} finest clusters hold {share['pool']:.1%} of the pool and "
              f"{share['curated']:.1%} of the curated subset.", ""]
    if not m["labelled"]:
        lines += ["The pool has no labels: it was balanced by cluster only; the checks compare its top-level clusters.",
                  ""]
    for kind, table in checks["by"].items():
        lines += [*shares_markdown(kind, table), ""]
    return "\n".join(lines).strip()


def _report(m: dict[str, Any], summary: str, files: dict[str, Path]) -> str:
    lines = [f"# fmtransfer curate: {m['recipe']} / {m['split']}", "", summary, "",
             f"![cluster sizes]({files['cluster_sizes'].name})", "", f"![PCA map]({files['pca'].name})", "",
             f"Use it: `data.subset={files['manifest']}`"]
    return "\n".join(lines) + "\n"
