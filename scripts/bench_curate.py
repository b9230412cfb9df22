"""FAISS curation benchmarks: quality on real data, the skew test, and speed/memory at a million embeddings.

    python scripts/bench_curate.py                       # all three parts
    python scripts/bench_curate.py --parts speed --n 1000000 --dim 384

quality: pretrain a ResNet-18 on the full global set (mnist_global), on a curated 20% and on a random 20% of
    its train split, with the same number of optimisation steps (the subsets train 5x the epochs); report the
    global test accuracy and the region's (uci_digits_region) zero-shot and LoRA-adapted (100 labels) accuracy.
    Curation embeds with the full-data model, as `fmtransfer pipeline` does.
sets: on every real recipe here (--sets; mnist_global, uci_digits_region and fashion_mnist by default), per seed:
    a ResNet-18 trained on the whole train split (the demo's settings: 6 epochs; fashion_mnist 2, --epochs), curated
    20% subsets at each --floors curation.balance_floor embedded by that model, and a random 20%, each trained for
    the same number of steps; the test accuracy of each, the curation's self-check warnings, dedup share and its
    smallest class share ratio. --train-limit NAME=N curates a class-stratified random N of the train split instead
    (val and test whole; the table says so). --embedders supervised dino also curates with a DINO run's embeddings
    (`pretrain method=dino`, 8 epochs, on the same train split, labels unused). --variants NAME=KEY=VALUE[;...] adds
    curations with other curate settings; --imbalance NAME=R draws a long-tailed pool (the first class whole, the
    last at 1/R; val and test even), the case curation is meant for.
skew: duplicate one class of the global train split 20x with small noise, curate, and compare the class shares
    of the pool and the curated subset (and what dedup removed), over 5 curation seeds, with the default levels
    and with the earlier default [100, 20, 5].
speed: a Gaussian mixture of --n x --dim float32 embeddings with very uneven cluster sizes, as a .npy on disk;
    the whole curation with the defaults (curate_embeddings: hierarchical k-means [1000, 100, 10] with k-means++
    seeding and 10 resampling steps of 5-iteration refits, near-duplicate removal inside the finest clusters,
    balanced sampling to 20%), the same with 20-iteration refits, with the refinement on a sample
    (curation.resample_sample=128; opt-in), with FAISS's uniform seeding and no dedup (an ablation), and
    scikit-learn's MiniBatchKMeans at k=1000, each in its own process, one round of them per --speed-seeds seed:
    wall time (median, and over MiniBatchKMeans's of the same round), peak RSS, how the mixture components are
    represented, and the load average.
Writes bench_curate.json and bench_curate.md under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADAPT_BASE = ROOT / "outputs" / "bench" / "adapt" / "bases" / "resnet18"


def _stage(name: str, overrides: list[str]):
    from fmtransfer.config import compose_stage
    from fmtransfer.tasks import adapt, curate, evaluate, pretrain

    module = {"pretrain": pretrain, "curate": curate, "evaluate": evaluate, "adapt": adapt}[name]
    return getattr(module, name)(compose_stage(name, overrides))


CURATION_CODE = ("fmtransfer/curation", "fmtransfer/clustering.py", "fmtransfer/tasks/curate.py", "fmtransfer/configs/curation")


def _digest(path: Path) -> str:
    files = sorted(f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts) if path.is_dir() \
        else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _key(name: str, overrides: list[str]) -> dict | None:
    """What a cached run depends on beyond its folder: the curation code (curate runs), the content of files
    named in the overrides (a curated manifest) and the keys of run folders named there. None: nothing of that."""
    deps = {}
    if name == "curate":
        deps["code"] = "".join(_digest(ROOT / c) for c in CURATION_CODE)
    for o in overrides:
        value = Path(o.split("=", 1)[-1])
        if value.is_file():
            deps[o] = _digest(value)
        elif (value / "bench_key.json").is_file():
            deps[o] = (value / "bench_key.json").read_text()
    return {"stage": name, "overrides": overrides, "deps": deps} if deps else None


def _run(name: str, folder: Path, overrides: list[str]) -> dict:
    """A stage run kept on disk: an interrupted benchmark resumes without redoing finished runs. A run that
    depends on the curation code or on a curated manifest is redone when either changed (bench_key.json)."""
    key = _key(name, overrides)
    key_file = folder / "bench_key.json"
    fresh = key is None or (key_file.is_file() and json.loads(key_file.read_text()) == key)
    if (folder / "metrics.json").is_file() and fresh:
        return json.loads((folder / "metrics.json").read_text())
    if (folder / "metrics.json").is_file():
        print(f"{folder}: the curation code or its inputs changed since this run; running it again", flush=True)
        shutil.rmtree(folder)
    _stage(name, [*overrides, f"run_dir={folder}"])
    if key is not None:
        key_file.write_text(json.dumps(key, indent=1) + "\n")
    return json.loads((folder / "metrics.json").read_text())


def quality(out: Path, fraction: float, seed: int = 0) -> dict:
    """One seed of the quality comparison (seed 0 reuses bench_adapt's full-data base and the configs' seed)."""
    from fmtransfer.config import compose_stage
    from fmtransfer.data import RecipeDataModule, load_recipe
    from fmtransfer.tasks.pretrain import epochs_for_steps

    q = out / ("quality" if seed == 0 else f"quality_s{seed}")
    seeded = [] if seed == 0 else [f"seed={seed}"]
    full_dir = ADAPT_BASE if seed == 0 else q / "full"
    full = _run("pretrain", full_dir, ["experiment=demo", "logger=none", *seeded])
    cur = _run("curate", q / "curate", [f"base={full_dir}", "data=mnist_global",
                                        f"curation.target_size={fraction}", *seeded])
    manifest = q / "curate" / "curated.csv"
    _run("curate", q / "curate_by_label", [f"base={full_dir}", "data=mnist_global",
                                           f"curation.target_size={fraction}", "curation.stratify_by=label", *seeded])
    by_label = q / "curate_by_label" / "curated.csv"
    dm = RecipeDataModule(load_recipe(compose_stage("pretrain", ["experiment=demo", "run_dir=/tmp/x"]).data))
    table = dm.prepare()
    train_ids = table.ids[dm.rows("train")]
    rng = np.random.default_rng(seed)
    random_ids = rng.choice(train_ids, size=cur["selected"], replace=False)
    random_manifest = q / "random.csv"
    random_manifest.parent.mkdir(parents=True, exist_ok=True)
    random_manifest.write_text("id\n" + "".join(f"{i}\n" for i in random_ids))
    batch = compose_stage("pretrain", ["experiment=demo", "run_dir=/tmp/x"]).loader.batch_size
    full_steps = full["global_step"]
    epochs = epochs_for_steps(full_steps, cur["selected"], batch)
    rows = {}
    for label, folder, extra in (("full", full_dir, []),
                                 (f"curated {fraction:.0%}", q / "pretrain_curated",
                                  [f"data.subset={manifest}", f"trainer.max_epochs={epochs}"]),
                                 (f"curated {fraction:.0%}, stratified by label", q / "pretrain_by_label",
                                  [f"data.subset={by_label}", f"trainer.max_epochs={epochs}"]),
                                 (f"random {fraction:.0%}", q / "pretrain_random",
                                  [f"data.subset={random_manifest}", f"trainer.max_epochs={epochs}"])):
        m = _run("pretrain", folder, ["experiment=demo", "logger=none", *seeded, *extra])
        key = folder.name
        zero = _run("evaluate", q / f"zero_{key}", [f"model={folder}", "data=uci_digits_region"])
        adapted = _run("adapt", q / f"adapt_{key}", [f"base={folder}", "adapter=lora", "calibration.size=100",
                                                     "logger=none", *seeded])
        rows[label] = {"train_images": m["data"]["splits"]["train"], "steps": m["global_step"],
                       "global_test": m["test"]["overall"]["accuracy"],
                       "region_zero_shot": zero["overall"]["accuracy"],
                       "region_lora_100": adapted["test"]["overall"]["accuracy"]}
        print(f"seed {seed}", label, rows[label], flush=True)
    return {"seed": seed, "rows": rows, "curation": {k: cur[k] for k in ("pool", "selected", "duplicates_removed",
                                                          "largest_10pct_clusters_share")}}


DINO_EMBEDDER = ["method=dino", "trainer.max_epochs=8"]  # the README's measured DINO defaults on these recipes


SETS_EPOCHS = 6  # the full-data run's epochs (the demo's settings); --epochs NAME=E changes it for one recipe
# fashion_mnist's 56,000 train images take 437 steps an epoch: 2 epochs (the story, 874 steps) keep a seed of
# full + curated + random near 30 min on one busy core
RECIPE_EPOCHS = {"fashion_mnist": 2}


def sets(out: Path, data: str, fraction: float, seed: int, floors: tuple[str, ...] = ("0.0", "0.25", "0.5"),
         embedders: tuple[str, ...] = ("supervised",), epochs: int = SETS_EPOCHS,
         train_limit: int | None = None, variants: dict[str, list[str]] | None = None,
         imbalance: float | None = None) -> dict:
    """One seed of the curated-vs-random-vs-full comparison on one recipe (see the module docstring). ``embedders``:
    whose embeddings curate: supervised (the full-data model) and/or dino (a `pretrain method=dino` run on the same
    train split, labels unused). ``epochs``: of the full-data run (the subsets take as many steps). ``train_limit``:
    the pool is a class-stratified random ``train_limit`` of the train split (a ``data.subset`` manifest drawn with
    the seed), val and test stay whole. Runs with other than the default epochs or a limit sit in their own folder
    (``<data>_e<epochs>_n<limit>``). ``variants``: more curations, name -> curate overrides (on the defaults), each
    trained and scored as a floor is (keys ``curated_<name>``). ``imbalance``: a long-tailed pool, class i of C (in
    label order) keeps ``imbalance ** (-i / (C - 1))`` of its images (the first all, the last 1 / imbalance; then
    scaled to ``train_limit`` when given), as a redundant, uneven pool is; val and test stay whole and even."""
    from fmtransfer.config import compose_stage
    from fmtransfer.data import RecipeDataModule, load_recipe
    from fmtransfer.tasks.pretrain import epochs_for_steps

    name = data + (f"_e{epochs}" if epochs != SETS_EPOCHS else "") + (f"_n{train_limit}" if train_limit else "") \
        + (f"_lt{imbalance:g}" if imbalance else "")
    q = out / "sets" / name / f"s{seed}"
    q.mkdir(parents=True, exist_ok=True)
    dm = RecipeDataModule(load_recipe(compose_stage("pretrain", [f"data={data}", "run_dir=/tmp/x"]).data))
    table = dm.prepare()
    train_rows = dm.rows("train")
    pool_ids, pool = table.ids[train_rows], []
    if imbalance:
        pool_ids = _long_tailed_ids(pool_ids, table.targets[train_rows], imbalance, train_limit, seed)
    elif train_limit and train_limit < len(train_rows):
        pool_ids = _stratified_ids(pool_ids, table.targets[train_rows], train_limit, seed)
    if len(pool_ids) < len(train_rows):  # a drawn pool: the runs read it as a manifest
        (q / "pool.csv").write_text("id\n" + "".join(f"{i}\n" for i in pool_ids))
        pool = [f"data.subset={q / 'pool.csv'}"]
    base = [f"data={data}", "backbone=resnet18", f"trainer.max_epochs={epochs}", "loader.batch_size=128",
            "logger=none", f"seed={seed}", "trainer.enable_progress_bar=false"]
    full = _run("pretrain", q / "full", [*base, *pool])
    row: dict = {"data": data, "seed": seed, "epochs": epochs, "train_limit": train_limit, "pool": len(pool_ids),
                 "imbalance": imbalance,
                 "steps": full["global_step"], "full": full["test"]["overall"]["accuracy"],
                 "test_n": full["data"]["splits"]["test"]}
    for embedder in embedders:
        model, tag = q / "full", ""  # supervised keeps the earlier runs' folder and key names
        if embedder == "dino":
            model, tag = q / "dino", "dino_"
            dino = _run("pretrain", model, [o for o in base if not o.startswith(("trainer.max_epochs", "loader."))]
                        + pool + DINO_EMBEDDER)
            row["dino_test_knn"] = dino["test"]["overall"]["accuracy"]
        curations = [(f"f{floor}", [f"curation.balance_floor={floor}"]) for floor in floors]
        curations += list((variants or {}).items())
        for key, extra in curations:
            key = tag + key
            cur = _run("curate", q / f"curate_{key}", [f"base={model}", f"data={data}", *pool,
                                                       f"curation.target_size={fraction}", *extra, f"seed={seed}"])
            sub_epochs = epochs_for_steps(full["global_step"], cur["selected"], 128)
            manifest = q / f"curate_{key}" / "curated.csv"
            m = _run("pretrain", q / f"pre_{key}", [*base, f"data.subset={manifest}",
                                                  f"trainer.max_epochs={sub_epochs}"])
            checks = cur["self_checks"]
            row[f"curated_{key}"] = m["test"]["overall"]["accuracy"]
            row[f"warnings_{key}"] = len(checks["warnings"])
            row[f"warning_texts_{key}"] = checks["warnings"]
            row[f"min_class_ratio_{key}"] = min(g["share_ratio"] for g in checks["by"]["class"]["groups"].values())
            row[f"dedup_share_{key}"] = checks["dedup_share"]
    random_ids = np.random.default_rng(seed).choice(pool_ids, size=cur["selected"], replace=False)
    manifest = q / "random.csv"
    manifest.write_text("id\n" + "".join(f"{i}\n" for i in random_ids))
    sub_epochs = epochs_for_steps(full["global_step"], cur["selected"], 128)
    m = _run("pretrain", q / "pre_random", [*base, f"data.subset={manifest}", f"trainer.max_epochs={sub_epochs}"])
    row.update(random=m["test"]["overall"]["accuracy"], subset=int(cur["selected"]))
    print("sets", row, flush=True)
    return row


def _long_tailed_ids(ids: np.ndarray, targets: np.ndarray, imbalance: float, limit: int | None,
                     seed: int) -> np.ndarray:
    """A long-tailed draw of ``ids``: class i of C (label order) keeps ``imbalance ** (-i / (C - 1))`` of its count,
    all scaled down to ``limit`` images when given; drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(targets, return_counts=True)
    keep = counts * imbalance ** (-np.arange(len(classes)) / max(len(classes) - 1, 1))
    if limit and keep.sum() > limit:
        keep *= limit / keep.sum()
    keep = np.maximum(np.floor(keep).astype(int), 1)
    return np.sort(np.concatenate([rng.choice(ids[targets == c], size=k, replace=False)
                                   for c, k in zip(classes, keep, strict=True)]))


def _stratified_ids(ids: np.ndarray, targets: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` of ``ids``, every class in proportion to its count (largest remainders), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(targets, return_counts=True)
    quota = np.floor(n * counts / counts.sum()).astype(int)
    quota[np.argsort(-(n * counts / counts.sum() - quota))[:n - quota.sum()]] += 1
    return np.sort(np.concatenate([rng.choice(ids[targets == c], size=q, replace=False)
                                   for c, q in zip(classes, quota, strict=True)]))


def skew(out: Path, fraction: float, seeds: list[int], ablation_levels: tuple[list[int], ...] = ([100, 20, 5],),
         copies: int = 20, skewed_class: str = "3") -> dict:
    """mnist_global with one class of the train split copied ``copies`` times (+ small noise), as an npz, curated
    with every seed in ``seeds`` (the default levels, and each of ``ablation_levels``)."""
    from fmtransfer.config import compose_stage
    from fmtransfer.data import RecipeDataModule, load_recipe

    folder = out / "skew"
    folder.mkdir(parents=True, exist_ok=True)
    _run("pretrain", ADAPT_BASE, ["experiment=demo", "logger=none"])  # the embedding model (quality's seed-0 full run)
    npz = folder / "mnist_skewed.npz"
    if not npz.is_file():
        dm = RecipeDataModule(load_recipe(compose_stage("pretrain", ["experiment=demo", "run_dir=/tmp/x"]).data))
        t = dm.prepare()
        images = np.round(t.images * 255).astype(np.uint8)
        labels = np.array([t.classes[i] for i in t.targets])
        ids, splits = list(map(str, t.ids)), list(t.splits)
        rng = np.random.default_rng(0)
        extra = np.flatnonzero((labels == skewed_class) & (t.splits == "train"))
        dup_images, dup_ids = [], []
        for c in range(1, copies):
            noisy = images[extra].astype(np.int16) + rng.integers(-6, 7, size=images[extra].shape)
            dup_images.append(np.clip(noisy, 0, 255).astype(np.uint8))
            dup_ids += [f"{ids[i]}_copy{c}" for i in extra]
        images = np.concatenate([images, *dup_images])
        labels = np.concatenate([labels, np.repeat(labels[extra][None], copies - 1, 0).ravel()])
        np.savez(npz, images=images, labels=labels, ids=np.array(ids + dup_ids),
                 splits=np.array(splits + ["train"] * len(dup_ids)))
    data = ["data=npz", f"data.source.path={npz}", "data.channels=1", "data.image_size=[28,28]",
            "data.mean=[0.1307]", "data.std=[0.3081]", "data.name=mnist_skewed"]
    first = folder / "curate"
    embeddings = first / "embeddings" / "embeddings.npy"
    out = {"class": skewed_class, "copies": copies, "seeds": list(seeds), "settings": {}}
    for levels in (None, *ablation_levels):
        label = "default" if levels is None else "levels=" + ",".join(map(str, levels))
        runs = []
        for seed in seeds:
            name = "curate" if (seed, levels) == (seeds[0], None) else f"curate_{label.replace('=', '_').replace(',', '-')}_s{seed}"
            extra = [] if name == "curate" else [f"curation.embeddings={embeddings}"]
            extra += [] if levels is None else [f"curation.levels=[{','.join(map(str, levels))}]"]
            m = _run("curate", folder / name, [f"base={ADAPT_BASE}", *data, f"curation.target_size={fraction}",
                                               f"seed={seed}", *extra])
            pool = {c: v["pool"] for c, v in m["per_class"].items()}
            cur = {c: v["curated"] for c, v in m["per_class"].items()}
            runs.append({"seed": seed, "levels": m["levels"], "pool_share": pool[skewed_class] / sum(pool.values()),
                         "curated_share": cur[skewed_class] / sum(cur.values()), "per_class": m["per_class"],
                         "duplicates_removed": m["duplicates_removed"], "pool": m["pool"], "selected": m["selected"]})
            print("skew", label, f"seed {seed}", f"{runs[-1]['pool_share']:.3f} -> {runs[-1]['curated_share']:.3f}",
                  "duplicates removed", m["duplicates_removed"], flush=True)
        shares = [r["curated_share"] for r in runs]
        out["settings"][label] = {"levels": runs[0]["levels"], "runs": runs, "pool_share": runs[0]["pool_share"],
                                  "curated_share_mean": float(np.mean(shares)), "curated_share_min": min(shares),
                                  "curated_share_max": max(shares)}
    return out


def make_mixture(path: Path, n: int, dim: int, components: int = 300, seed: int = 0) -> None:
    """A Gaussian mixture with Zipf-like component sizes (the largest holds ~15%, the smallest a few hundred)."""
    if path.is_file() and np.load(path, mmap_mode="r").shape == (n, dim):
        return
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, components + 1) ** 1.1
    comp = rng.choice(components, size=n, p=weights / weights.sum())
    centers = rng.normal(size=(components, dim)).astype(np.float32) * 4
    scales = rng.uniform(0.5, 1.5, size=components).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 100_000):
        c = comp[start:start + 100_000]
        out[start:start + len(c)] = centers[c] + rng.normal(size=(len(c), dim)).astype(np.float32) * scales[c, None]
    out.flush()
    np.save(path.with_suffix(".components.npy"), comp)


CURATION = """
import numpy as np, os, time, json, resource, sys
from fmtransfer.curation.curate import CurationSettings, curate_embeddings
x = np.load(sys.argv[1], mmap_mode="r")
seed = int(sys.argv[2])
init, dedup = sys.argv[3], sys.argv[4] == "dedup"
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
load = os.getloadavg()[0]
t = time.perf_counter()
settings = CurationSettings(target_size=0.2, levels=[1000, 100, 10], resampling_steps=10, init=init, dedup=dedup,
                            dedup_threshold=0.99, **extra)
cur = curate_embeddings(x, settings, seed=seed, log=lambda m: print(m, file=sys.stderr, flush=True))
total = time.perf_counter() - t
comp = np.load(sys.argv[1].replace(".npy", ".components.npy"))
sizes = np.bincount(comp)
order = np.argsort(sizes)[::-1]
big, small = order[:len(order) // 10], order[len(order) // 2:]
chosen = cur.selected
print(json.dumps({"seconds": total, "seed": seed, "load": [load, os.getloadavg()[0]],
                  **{f"{k}_seconds": v for k, v in cur.seconds.items()},
                  "selected": int(len(chosen)), "duplicates": int((~cur.kept).sum()),
                  "largest_10pct_components_share": {"pool": float(np.isin(comp, big).mean()),
                                                      "curated": float(np.isin(comp[chosen], big).mean())},
                  "smallest_half_components_share": {"pool": float(np.isin(comp, small).mean()),
                                                      "curated": float(np.isin(comp[chosen], small).mean())},
                  "components_present": {"pool": int((sizes > 0).sum()),
                                         "curated": int(len(np.unique(comp[chosen])))},
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
CHILD = {
    # the whole curation with the defaults (k-means++ seeding, the paper's resampling refinement with 5-iteration
    # refits, dedup inside the finest clusters, balanced sampling)
    "curation": (CURATION, ["kmeans++", "dedup"]),
    # the same with 20-iteration refits (the refits' length until 2026-11-23)
    "curation_refit20": (CURATION, ["kmeans++", "dedup", '{"refit_niter": null}']),
    # the same with the refinement on a sample of 128 points a cluster (opt-in)
    "curation_sampled_refits": (CURATION, ["kmeans++", "dedup", '{"resample_sample": 128}']),
    # the same without k-means++ (FAISS's uniform seeds) and without dedup: what the seeding buys
    "curation_random_init": (CURATION, ["random", "nodedup"]),
    "minibatch_kmeans": ("""
import numpy as np, os, time, json, resource, sys
from sklearn.cluster import MiniBatchKMeans
x = np.load(sys.argv[1], mmap_mode="r")
load = os.getloadavg()[0]
t = time.perf_counter()
MiniBatchKMeans(n_clusters=1000, batch_size=4096, n_init=1, max_iter=10, random_state=int(sys.argv[2])).fit(x)
print(json.dumps({"seconds": time.perf_counter() - t, "seed": int(sys.argv[2]), "load": [load, os.getloadavg()[0]],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""", []),
}


def speed(out: Path, n: int, dim: int, parts: list[str], seeds: list[int]) -> dict:
    """Each part once per seed, in rounds (every part of a round runs under about the same load of a shared
    machine), each in a fresh process; a part's row holds the median seconds and RSS over its runs, its other
    figures from the first seed, every run in ``runs``, and ``vs_minibatch``: the median over rounds of its seconds
    over MiniBatchKMeans's in the same round."""
    path = out / "speed" / f"mixture_{n}x{dim}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_mixture(path, n, dim)
    result = {"n": n, "dim": dim, "file_mb": path.stat().st_size / 2**20, "seeds": seeds}
    runs: dict[str, list[dict]] = {name: [] for name in parts}
    for seed in seeds:
        for name in parts:
            t = time.perf_counter()
            code, argv = CHILD[name]
            proc = subprocess.run([sys.executable, "-c", code, str(path), str(seed), *argv], capture_output=True,
                                  text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], f"({time.perf_counter() - t:.0f} s with start-up)", flush=True)
    for name, done in runs.items():
        result[name] = {**done[0], "seconds": float(np.median([r["seconds"] for r in done])),
                        "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in done])), "runs": done}
        if "minibatch_kmeans" in runs and name != "minibatch_kmeans":
            result[name]["vs_minibatch"] = float(np.median([r["seconds"] / m["seconds"] for r, m in
                                                            zip(done, runs["minibatch_kmeans"], strict=True)]))
    return result


def _load_range(s: dict) -> str:
    """The lowest and highest load average seen by the speed runs."""
    loads = [v for name in CHILD if name in s for r in s[name].get("runs", []) for v in r.get("load", [])]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"


def _curated_label(key: str) -> str:
    """'f0.5' -> 'curated, floor 0.5'; 'dino_f0.5' -> 'curated (DINO embeddings), floor 0.5'; a --variants name
    -> 'curated, <name>'."""
    dino, key = key.startswith("dino_"), key.removeprefix("dino_")
    what = f"floor {key[1:]}" if _is_floor(key) else key
    return f"curated{' (DINO embeddings)' if dino else ''}, {what}"


def _is_floor(key: str) -> bool:
    try:
        float(key.removeprefix("dino_")[1:])
    except ValueError:
        return False
    return key.removeprefix("dino_").startswith("f")


def _variants(pairs: list[str]) -> dict[str, list[str]]:
    """NAME=OVERRIDE[;OVERRIDE...] -> {name: [overrides]}; a malformed pair is refused."""
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        overrides = [o for o in value.split(";") if o]
        if not name.isidentifier() or _is_floor(name) or not overrides or any("=" not in o for o in overrides):
            raise SystemExit(f"--variants {pair!r}: expected NAME=KEY=VALUE[;KEY=VALUE...], e.g. "
                             f"closest=curation.within_cluster=closest")
        out[name] = overrides
    return out


def _pairs(option: str, pairs: list[str], recipes: list[str], ratio: bool = False) -> dict[str, float]:
    """NAME=N pairs -> {recipe: N} (whole N >= 1; with ``ratio``, any number N > 1, e.g. 2.5); a malformed pair or a
    recipe not in --sets is refused."""
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            number = float(value) if ratio else int(value)
        except ValueError:
            number = None
        if name not in recipes or number is None or not math.isfinite(number) \
                or not (number > 1 if ratio else number >= 1):
            expected = "a number R > 1" if ratio else "a whole N >= 1"
            raise SystemExit(f"{option} {pair!r}: expected NAME={'R' if ratio else 'N'} with NAME one of --sets "
                             f"{recipes} and {expected}")
        out[name] = number
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["quality", "sets", "skew", "speed"])
    p.add_argument("--sets", nargs="+", default=["mnist_global", "uci_digits_region", "fashion_mnist"],
                   help="sets: the recipes")
    p.add_argument("--floors", nargs="+", default=["0.0", "0.25", "0.5"], help="sets: curation.balance_floor values")
    p.add_argument("--variants", nargs="+", default=[], metavar="NAME=OVERRIDES",
                   help="sets: more curations beside the floors, each NAME=KEY=VALUE[;KEY=VALUE...] of curate "
                        "overrides, e.g. closest=curation.within_cluster=closest")
    p.add_argument("--embedders", nargs="+", default=["supervised"], choices=["supervised", "dino"],
                   help="sets: whose embeddings curate (dino: a `pretrain method=dino` run on the same train split)")
    p.add_argument("--epochs", nargs="+", default=[], metavar="NAME=E",
                   help=f"sets: the full-data run's epochs for a recipe (default {RECIPE_EPOCHS}, else {SETS_EPOCHS}), "
                        f"e.g. mnist_global=3")
    p.add_argument("--train-limit", nargs="+", default=[], metavar="NAME=N",
                   help="sets: curate from a class-stratified random N of a recipe's train split (val and test "
                        "whole), e.g. fashion_mnist=14000 where the whole split takes too long on CPU")
    p.add_argument("--imbalance", nargs="+", default=[], metavar="NAME=R",
                   help="sets: a long-tailed pool of a recipe's train split, the first class whole and the last at "
                        "1/R of its images (val and test whole and even), e.g. mnist_global=10")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="quality: one full comparison per seed")
    p.add_argument("--skew-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="skew: curation seeds")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--speed-parts", nargs="+", default=list(CHILD))
    p.add_argument("--speed-seeds", type=int, nargs="+", default=[0],
                   help="speed: one round of --speed-parts per seed (curation and MiniBatchKMeans seeds)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "curate")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "bench_curate.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if "quality" in args.parts:
        runs = [quality(args.out, args.fraction, seed) for seed in args.seeds]
        results["quality"] = {"seeds": args.seeds, "runs": runs, "rows": {
            label: {k: float(np.mean([r["rows"][label][k] for r in runs])) for k in runs[0]["rows"][label]}
            | {f"{k}_sd": float(np.std([r["rows"][label][k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0
               for k in ("global_test", "region_zero_shot", "region_lora_100")}
            for label in runs[0]["rows"]}}
    if "sets" in args.parts:
        epochs = RECIPE_EPOCHS | _pairs("--epochs", args.epochs, args.sets)
        limits = _pairs("--train-limit", args.train_limit, args.sets)
        tails = _pairs("--imbalance", args.imbalance, args.sets, ratio=True)
        variants = _variants(args.variants)  # refused before anything trains
        results["sets"] = {d: [sets(args.out, d, args.fraction, seed, tuple(args.floors), tuple(args.embedders),
                                    epochs.get(d, SETS_EPOCHS), limits.get(d), variants, tails.get(d))
                               for seed in args.seeds]
                           for d in args.sets}
    if "skew" in args.parts:
        results["skew"] = skew(args.out, args.fraction, args.skew_seeds)
    if "speed" in args.parts:
        results["speed"] = speed(args.out, args.n, args.dim, args.speed_parts, args.speed_seeds)
    json_path.write_text(json.dumps(results, indent=2) + "\n")

    lines = []
    if "quality" in results:
        q = results["quality"]["rows"]
        full = q["full"]["global_test"]
        lines += [f"Mean +- sd over seeds {results['quality'].get('seeds', [0])}:", "",
                  "| pretraining data | train images | steps | global test acc | vs full | region zero-shot | "
                  "region LoRA (100 labels) |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['train_images']:.0f} | {v['steps']:.0f} | {v['global_test']:.4f} +- "
                  f"{v.get('global_test_sd', 0):.4f} | {v['global_test'] / full:.1%} | {v['region_zero_shot']:.4f} +- "
                  f"{v.get('region_zero_shot_sd', 0):.4f} | {v['region_lora_100']:.4f} +- "
                  f"{v.get('region_lora_100_sd', 0):.4f} |" for k, v in q.items()]
        lines.append("")
    if "sets" in results:
        floors = sorted({k[len("curated_"):] for runs in results["sets"].values() for k in runs[0]
                         if k.startswith("curated_")},
                        key=lambda f: (f.startswith("dino"), not _is_floor(f),
                                       float(f.removeprefix("dino_")[1:]) if _is_floor(f) else f))
        lines += ["Curated 20% against random 20% and all, at equal steps (ResNet-18, test accuracy, mean +- sd "
                  "over seeds; class ratio: the smallest class's curated share over its pool share):", "",
                  "| recipe | all | " + " | ".join(_curated_label(f) for f in floors) + " | random | "
                  + " | ".join(f"class ratio, {_curated_label(f)}" for f in floors) + " |",
                  "|---|---:|" + "---:|" * (2 * len(floors) + 1)]
        for data, runs in results["sets"].items():
            def ms(key, runs=runs):
                v = [r[key] for r in runs]
                return f"{np.mean(v):.4f} +- {np.std(v, ddof=1) if len(v) > 1 else 0:.4f}"
            limit = f", pool {runs[0]['pool']:,} of the train split" if runs[0].get("train_limit") else ""
            limit += f", long-tailed {runs[0]['imbalance']:g}:1" if runs[0].get("imbalance") else ""
            lines.append(f"| {data} ({runs[0].get('epochs', SETS_EPOCHS)} epochs, {runs[0]['steps']} steps{limit}) | "
                         f"{ms('full')} | "
                         + " | ".join(ms(f"curated_{f}") if f"curated_{f}" in runs[0] else "-" for f in floors)
                         + f" | {ms('random')} | "
                         + " | ".join(f"{np.mean([r[f'min_class_ratio_{f}'] for r in runs]):.2f}"
                                      if f"min_class_ratio_{f}" in runs[0] else "-" for f in floors) + " |")
            if "dino_test_knn" in runs[0]:
                lines.append(f"| {data}: the DINO embedder's own test kNN | {ms('dino_test_knn')} |")
        lines.append("")
    if "skew" in results:
        s = results["skew"]
        first = next(iter(s["settings"].values()))
        lines += [f"Skew test: class {s['class']} copied {s['copies']}x (+ noise) in the train split holds "
                  f"{first['pool_share']:.1%} of the pool ({first['runs'][0]['pool']} images; natural share ~10%). "
                  f"Its share of the curated {first['runs'][0]['selected']}, over curation seeds {s['seeds']}:", "",
                  "| curation | levels | class share, mean | min | max | duplicates removed |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {label} | {v['levels']} | {v['curated_share_mean']:.1%} | {v['curated_share_min']:.1%} | "
                  f"{v['curated_share_max']:.1%} | {v['runs'][0]['duplicates_removed']} |"
                  for label, v in s["settings"].items()]
        lines.append("")
    if "speed" in results:
        s = results["speed"]
        lines += [f"Speed: {s['n']:,} x {s['dim']} float32 embeddings ({s['file_mb']:.0f} MiB .npy):", "",
                  f"Medians over seeds {s.get('seeds', [0])}, one round of every part per seed; load average "
                  f"{_load_range(s)} at the runs' starts and ends", "",
                  "| step | wall time (s) | / MiniBatchKMeans, same round | peak RSS (MiB) | RSS / file |",
                  "|---|---:|---:|---:|---:|"]
        for name in CHILD:
            if name in s:
                phases = ", ".join(f"{k[:-8]} {v:.0f}" for k, v in s[name].items()
                                   if k.endswith("_seconds") and k != "seconds")
                ratio = f"{s[name]['vs_minibatch']:.2f}" if "vs_minibatch" in s[name] else ""
                lines.append(f"| {name}{f' ({phases})' if phases else ''} | {s[name]['seconds']:.0f} | {ratio} | "
                             f"{s[name]['peak_rss_mb']:.0f} | {s[name]['peak_rss_mb'] / s['file_mb']:.2f} |")
        rows = [n for n in CHILD if n in s and "components_present" in s[n]]
        if rows:
            lines += ["", "| mixture components | pool | " + " | ".join(f"curated by {n}" for n in rows) + " |",
                      "|---|---:|" + "---:|" * len(rows)]
            for key, label in (("largest_10pct_components_share", "share of the largest 10%"),
                               ("smallest_half_components_share", "share of the smallest half")):
                lines.append(f"| {label} | {s[rows[0]][key]['pool']:.1%} | "
                             + " | ".join(f"{s[n][key]['curated']:.1%}" for n in rows) + " |")
            lines.append(f"| components present | {s[rows[0]]['components_present']['pool']} | "
                         + " | ".join(str(s[n]['components_present']['curated']) for n in rows) + " |")
            lines += ["", "Per seed (share of the largest 10% / smallest half of the components, seconds):", ""]
            lines += [f"- {n}: " + "; ".join(f"seed {r['seed']}: {r['largest_10pct_components_share']['curated']:.1%}"
                                             f" / {r['smallest_half_components_share']['curated']:.1%}, "
                                             f"{r['seconds']:.0f} s" for r in s[n].get("runs", [s[n]]))
                      for n in rows]
    table = "\n".join(lines)
    (args.out / "bench_curate.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwrote {json_path}, {args.out / 'bench_curate.md'}")


if __name__ == "__main__":
    main()
