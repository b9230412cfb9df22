"""Self-supervised pretraining benchmark (issue #13): feature quality, regional LoRA over a DINO base, DINO throughput.

    python scripts/bench_ssl.py --quick                                  # smoke: 1 seed, 1 epoch, a few steps
    python scripts/bench_ssl.py                                          # the full benchmark (hours on 2 CPU cores)
    python scripts/bench_ssl.py --sections features --archs resnet18 --dino-epochs 50 \\
        --dino-override method.dino.teacher_temp=0.04                     # try DINO settings
    python scripts/bench_ssl.py --dino-model resnet18=outputs/pretrain/<run>   # score a DINO model trained elsewhere
    python scripts/bench_ssl.py --sections features --archs resnet18 --seeds 0 --data fashion_mnist \
        --data-override data.limit=12000 --dino-model resnet18=<run> --supervised-model <run>   # another recipe

Sections (``--sections``):

- ``features``: kNN (k=20, cosine, temperature 0.07: the ``evaluate`` config's ``knn`` node) and linear-probe
  accuracy on mnist_global's (``--data``, with ``--data-override``s) test split, the bank / probe fitted on its
  train split (4,000 images), for raw pixels
  (and their 1-NN), random init (``pretrain method=dino trainer.max_epochs=0``), the supervised backbone
  (``experiment=demo``) and DINO (``pretrain method=dino``) per ``--archs``; models are scored by
  ``evaluate protocol=knn|linear``, raw pixels by the same ``fmtransfer.models.probes`` functions.
- ``regional``: LoRA on uci_digits_region at n = 25, 50, 100 over the supervised base, the DINO ResNet-18 base,
  and each of them with ``regional_pretrain.epochs=N`` (pretrained once per seed, then ``regional_pretrain.reuse``:
  the pretraining reads no labels, so it is the same for every n). The bases are those of the first seed.
- ``throughput``: DINO training images (not crops) per second of ``pretrain method=dino`` (Lightning) against a
  plain PyTorch loop built from the same ``fmtransfer.models.dino`` / ``fmtransfer.data.multicrop`` objects (backbone,
  head, loss, centring, EMA teacher, schedules, gradient clipping, the same per-image crops and batch size), in this
  process, rounds alternating which goes first; the first epoch of every run is warm-up and dropped.

Every run is kept under ``--out`` and skipped when its ``run.json`` says it ended ``ok``, so a re-run resumes; a
run's directory name carries a digest of its settings, so changed settings never reuse a stale run. Writes
``bench_ssl.md`` (the tables, also printed) and ``bench_ssl.json`` (every number, the overrides, seeds, wall times,
the machine and the targets, met or not).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmtransfer.config import build, compose_stage  # noqa: E402
from fmtransfer.data import build_datamodule, load_recipe  # noqa: E402
from fmtransfer.models.dino import DinoHead, DinoLoss  # noqa: E402
from fmtransfer.models.probes import knn_scores, linear_probe_scores  # noqa: E402
from fmtransfer.tasks.adapt import adapt  # noqa: E402
from fmtransfer.tasks.evaluate import evaluate  # noqa: E402
from fmtransfer.tasks.pretrain import pretrain  # noqa: E402
from fmtransfer.tasks.pretrain_dino import student_backbone, validate_dino  # noqa: E402

# vit_tiny: ViT-Tiny (5.5M, patch 4 at 28x28); tiny_vit: timm's 0.25M test ViT, for when ViT-Tiny's DINO is too slow
ARCHS = {"resnet18": ["backbone=resnet18"], "vit_tiny": ["backbone=vit_tiny"], "tiny_vit": ["backbone=tiny_vit"]}
SUPERVISED = ["experiment=demo"]  # bench_adapt.py's ResNet-18 base
FEATURE_DATA, REGION_DATA = "mnist_global", "uci_digits_region"
REGIONAL_ARCH = "resnet18"  # the supervised base is a ResNet-18: LoRA over the same architecture
SECTIONS = ("features", "regional", "throughput")
TARGETS = {"dino_knn": 0.97, "dino_linear": 0.97, "throughput_ratio": 0.9}
RAW_1NN_REPORTED = 0.936


def digest(items: Any) -> str:
    """A short stable name for a run's settings."""
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:8]


def finished(run: Path) -> bool:
    """Whether ``run`` holds a stage that ended ``ok`` (its run.json)."""
    try:
        return json.loads((run / "run.json").read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


@dataclass
class Bench:
    """The options, and every piece run (or found finished) with its wall time."""

    args: argparse.Namespace
    pieces: list[dict[str, Any]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.args.out

    def stage(self, name: str, run: Path, stage: str, overrides: list[str], fn: Callable) -> dict[str, Any]:
        """Run ``fn(compose_stage(stage, overrides))`` into ``run`` unless it finished before; its metrics.json."""
        wall = run / "bench_wall.json"
        cached = finished(run)
        if cached:
            seconds = json.loads(wall.read_text())["seconds"] if wall.is_file() else None
        else:
            print(f"[bench_ssl] {name}: {stage} {' '.join(overrides)}", flush=True)
            started = time.perf_counter()
            fn(compose_stage(stage, [*overrides, f"run_dir={run}"]))
            seconds = round(time.perf_counter() - started, 1)
            wall.write_text(json.dumps({"seconds": seconds}) + "\n")
        self.pieces.append({"piece": name, "stage": stage, "overrides": overrides, "run_dir": str(run),
                            "seconds": seconds, "reused": cached})
        return json.loads((run / "metrics.json").read_text())

    def timed(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, a piece whose result is not kept on disk, with its wall time."""
        started = time.perf_counter()
        value = fn(*args)
        self.pieces.append({"piece": name, "seconds": round(time.perf_counter() - started, 1), "reused": False})
        return value


# ---------------------------------------------------------------------------------------------------- settings

def quick_train(args: argparse.Namespace) -> list[str]:
    """--quick: a few training batches of each epoch."""
    return [f"trainer.limit_train_batches={args.quick_batches}", "trainer.limit_val_batches=2"] if args.quick else []


def feature_data(args: argparse.Namespace) -> list[str]:
    """The features section's recipe: ``--data`` and its ``--data-override``s."""
    return [f"data={args.data}", *args.data_override]


def dino_overrides(args: argparse.Namespace, arch: str, epochs: int) -> list[str]:
    return ["method=dino", *feature_data(args), *ARCHS[arch], f"trainer.max_epochs={epochs}",
            *(quick_train(args) if epochs else []), *args.dino_override]


def supervised_overrides(args: argparse.Namespace) -> list[str]:
    epochs = [f"trainer.max_epochs={args.sup_epochs}"] if args.sup_epochs else []
    return [*SUPERVISED, *feature_data(args), *epochs, *quick_train(args)]


def model_runs(bench: Bench) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The models the features section scores: {kind: {arch: [{"seed", "run", "overrides"}]}}; trains none."""
    args = bench.args
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"random init": {}, "supervised": {}, "DINO": {}}
    for arch in args.archs:
        rand = dino_overrides(args, arch, 0)
        runs["random init"][arch] = [{"seed": s, "overrides": [*rand, f"seed={s}"],
                                      "run": bench.out / "pretrain" / f"random_{arch}_{digest(rand)}_s{s}"}
                                     for s in args.seeds]
        if arch in args.dino_model:
            runs["DINO"][arch] = [{"seed": None, "overrides": None, "run": Path(args.dino_model[arch])}]
        else:
            dino = dino_overrides(args, arch, args.dino_epochs)
            runs["DINO"][arch] = [{"seed": s, "overrides": [*dino, f"seed={s}"],
                                   "run": bench.out / "pretrain" / f"dino_{arch}_{digest(dino)}_s{s}"}
                                  for s in args.seeds]
    if args.supervised_model:
        runs["supervised"]["resnet18"] = [{"seed": None, "overrides": None, "run": Path(args.supervised_model)}]
        return runs
    sup = supervised_overrides(args)
    runs["supervised"]["resnet18"] = [{"seed": s, "overrides": [*sup, f"seed={s}"],
                                       "run": bench.out / "pretrain" / f"supervised_resnet18_{digest(sup)}_s{s}"}
                                      for s in args.seeds]
    return runs


def ensure_model(bench: Bench, name: str, entry: dict[str, Any]) -> Path:
    """Train the model ``entry`` names unless it is given or finished; its run dir."""
    if entry["overrides"] is not None:
        bench.stage(name, entry["run"], "pretrain", [*entry["overrides"], "logger=none"], pretrain)
    elif not (entry["run"] / "model.json").is_file():
        raise SystemExit(f"--dino-model {entry['run']}: no model.json there")
    return entry["run"]


# ---------------------------------------------------------------------------------------------------- features

def raw_pixels(bench: Bench) -> dict[str, Any]:
    """kNN (k=20), 1-NN and the linear probe on flattened, normalised pixels (the input every backbone sees)."""
    cfg = compose_stage("evaluate", feature_data(bench.args))
    recipe = load_recipe(cfg.data)
    dm = build_datamodule(recipe, {"batch_size": 512, "num_workers": 0})
    table = dm.prepare()

    def pixels(split: str) -> tuple[np.ndarray, np.ndarray]:
        x = torch.cat([batch[0].flatten(1) for batch in dm.dataloader(split)]).numpy()
        return x, table.targets[dm.rows(split)]

    (train, train_y), (test, test_y) = pixels("train"), pixels("test")
    classes, knn, lin = len(table.classes), cfg.knn, cfg.linear

    def accuracy(scores: np.ndarray) -> float:
        return float((scores.argmax(1) == test_y).mean())

    return {"knn": accuracy(knn_scores(train, train_y, test, classes, int(knn.k), float(knn.temperature))),
            "nn1": accuracy(knn_scores(train, train_y, test, classes, 1, float(knn.temperature))),
            "linear": accuracy(linear_probe_scores(train, train_y, test, classes, float(lin.c), int(lin.max_iter))),
            "bank": len(train), "test": len(test)}


def score(bench: Bench, name: str, model: Path, seed: int | None) -> dict[str, float]:
    """``evaluate protocol=knn`` and ``protocol=linear`` of ``model`` on the features recipe's test split."""
    scores = {}
    for protocol in ("knn", "linear"):
        overrides = [f"model={model.resolve()}", *feature_data(bench.args), "split=test", f"protocol={protocol}",
                     f"seed={seed if seed is not None else 0}"]
        run = bench.out / "evaluate" / f"{model.name}_{protocol}_{digest(overrides)}"
        scores[protocol] = bench.stage(f"{name} {protocol}", run, "evaluate", overrides, evaluate)["overall"]["accuracy"]
    return scores


def spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values), "values": values}


def features(bench: Bench) -> dict[str, Any]:
    out: dict[str, Any] = {"raw pixels": bench.timed("raw pixels kNN / 1-NN / linear", raw_pixels, bench)}
    for kind, archs in model_runs(bench).items():
        for arch, entries in archs.items():
            rows = []
            for e in entries:
                name = f"{kind} {arch} seed {e['seed']}"
                run = ensure_model(bench, name, e)
                rows.append({"seed": e["seed"], "run": str(run), **score(bench, name, run, e["seed"])})
            out[f"{kind} {arch}"] = {"kind": kind, "arch": arch, "runs": rows,
                                     "knn": spread([r["knn"] for r in rows]),
                                     "linear": spread([r["linear"] for r in rows])}
    return out


# ---------------------------------------------------------------------------------------------------- regional

def regional(bench: Bench) -> dict[str, Any]:
    """LoRA at each n and seed over the supervised base, the DINO base, the DINO base + regional pretraining and the
    supervised base + regional pretraining."""
    args, runs = bench.args, model_runs(bench)
    if REGIONAL_ARCH not in runs["DINO"]:
        raise SystemExit(f"--sections regional needs a DINO {REGIONAL_ARCH} (add it to --archs, or --dino-model "
                         f"{REGIONAL_ARCH}=PATH)")
    bases = {"supervised": ensure_model(bench, "supervised base", runs["supervised"][REGIONAL_ARCH][0]),
             "DINO": ensure_model(bench, "DINO base", runs["DINO"][REGIONAL_ARCH][0])}
    steps = [f"adapter.steps={args.quick_steps}"] if args.quick else []
    # do_no_harm.folds=0: the K-fold check costs K fits and is not what this grid measures (test accuracy is)
    common = [f"data={REGION_DATA}", "adapter=lora", "logger=none", "checkpoints=1", "do_no_harm.folds=0", *steps,
              *quick_train(args)]
    regional_pre = [f"regional_pretrain.epochs={args.regional_epochs}", "regional_pretrain.compare=false"]
    # the last arm is what `pipeline regional_pretrain.epochs=N` does: regional DINO over the supervised global model
    arms = {"supervised": (bases["supervised"], []), "DINO": (bases["DINO"], []),
            "DINO + regional": (bases["DINO"], regional_pre),
            "supervised + regional": (bases["supervised"], regional_pre)}
    rows: dict[str, Any] = {}
    for arm, (base, extra) in arms.items():
        rows[arm] = {"base": str(base), "overrides": [*common, *extra], "sizes": {}}
        for seed in args.seeds:
            pretrained: Path | None = None  # the seed's first regional run: the later sizes reuse its pretraining
            for size in args.sizes:
                reuse = [f"regional_pretrain.reuse={pretrained}"] if pretrained else []
                overrides = [f"base={base.resolve()}", *common, *extra, f"calibration.size={size}", f"seed={seed}"]
                run = bench.out / "adapt" / f"{arm.replace(' + ', '_')}_n{size}_s{seed}_{digest(overrides)}"
                m = bench.stage(f"{arm} n={size} seed {seed}", run, "adapt", [*overrides, *reuse], adapt)
                if extra and pretrained is None:
                    pretrained = run.resolve()
                rp = m.get("regional_pretrain") or {}
                rows[arm]["sizes"].setdefault(size, []).append(
                    {"seed": seed, "accuracy": m["test"]["overall"]["accuracy"], "fit_seconds": m["fit_seconds"],
                     "regional_seconds": rp.get("seconds"), "regional_reused": bool(reuse),
                     "feature_knn_val": rp.get("feature_knn_val"), "run": str(run)})
        for size, sel in rows[arm]["sizes"].items():
            rows[arm]["sizes"][size] = {"runs": sel, "accuracy": spread([r["accuracy"] for r in sel])}
    return rows


# ---------------------------------------------------------------------------------------------------- throughput

def throughput_overrides(args: argparse.Namespace, arch: str) -> list[str]:
    # the per-epoch kNN monitor runs after an epoch's last batch (outside the timed window); a small bank keeps it short
    return ["method=dino", f"data={FEATURE_DATA}", *ARCHS[arch], f"trainer.max_epochs={args.tp_epochs}",
            f"trainer.limit_train_batches={args.tp_batches}", f"loader.batch_size={args.tp_batch_size}",
            "method.dino.knn.max_bank=256", "logger=none", *args.dino_override]


def framework_rate(cfg) -> tuple[float, list[float]]:
    """Images per second of ``pretrain method=dino`` (the median over the epochs after the first) and the mean loss
    of every epoch."""
    metrics = pretrain(cfg).metrics
    per_epoch = metrics["train_images_per_s"]["per_epoch"]
    return statistics.median(per_epoch[1:] or per_epoch), [e["loss"] for e in metrics["dino"]["epochs"]]


def _crop_keys(seed: int, epoch: int, rows: torch.Tensor) -> list[int]:
    """One crop seed per image, as ``DinoModule`` draws them: both loops crop every image alike."""
    return [int(np.random.SeedSequence([seed, epoch, int(r)]).generate_state(1)[0]) for r in rows.tolist()]


def by_size(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Runs of consecutive views of one size (the global views, then the local ones): one backbone call each."""
    groups: list[list[torch.Tensor]] = []
    for v in views:
        if groups and groups[-1][0].shape[-2:] == v.shape[-2:]:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


def plain_rate(cfg, epochs: int, batches: int) -> tuple[float, list[float]]:
    """The DINO loop a practitioner would write without Lightning, over the stage's own pieces and data: images per
    second (as :func:`framework_rate`) and the mean loss of every epoch."""
    recipe, spec, settings = validate_dino(cfg)
    torch.manual_seed(int(cfg.seed))
    # the stage's own student backbone and crop plan (a ViT with dynamic_img_size, a new ResNet's residual branches
    # not zeroed): the same model, built the same way
    backbone, plan = student_backbone(spec, recipe, settings)
    crops = plan.build(settings.crops)
    head = DinoHead(int(backbone.num_features), settings.prototypes, settings.hidden_dim, settings.bottleneck_dim,
                    settings.head_batch_norm)
    student = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss_fn = DinoLoss(settings.prototypes, settings.student_temp, settings.center_momentum)
    optimizer = build(cfg.method.optimizer, "method.optimizer")(list(student.parameters()))
    total = epochs * batches
    scheduler = build(cfg.method.scheduler, "method.scheduler")(optimizer, total_steps=total)
    loader = build_datamodule(recipe, cfg.loader, seed=int(cfg.seed), require_labels=False).dataloader(
        "train", shuffle=True)
    generator, step, per_epoch, losses = torch.Generator(), 0, [], []
    student.train()
    teacher.train()
    for epoch in range(epochs):
        generator.manual_seed(int(cfg.seed) + epoch)
        start, images, epoch_loss = time.perf_counter(), 0, []
        loader.sampler.set_epoch(epoch)  # the stage's EpochSampler order (Lightning calls it there)
        for i, (x, _y, rows) in enumerate(loader):
            if i >= batches:
                break
            progress = min(1.0, step / total)
            views = crops(x, generator=generator, keys=_crop_keys(int(cfg.seed), epoch, rows))
            with torch.no_grad():
                t_out = teacher["head"](teacher["backbone"](torch.cat(views[:2])))
            s_out = torch.cat([student["head"](student["backbone"](torch.cat(group))) for group in by_size(views)])
            loss, _ = loss_fn(list(s_out.chunk(len(views))), list(t_out.chunk(2)),
                              settings.teacher_temperature(progress))
            loss_fn.update_center(t_out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if epoch < settings.freeze_last_layer_epochs:
                head.prototypes.grad = None
            if settings.clip_grad:
                torch.nn.utils.clip_grad_norm_(student.parameters(), settings.clip_grad)
            optimizer.step()
            scheduler.step()
            m = settings.momentum(min(1.0, (step + 1) / total))  # the stage's EMA runs after the step is counted
            with torch.no_grad():
                for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
                    t.mul_(m).add_(s.detach(), alpha=1 - m)
            step += 1
            images += len(x)
            epoch_loss.append(float(loss.detach()))
        per_epoch.append(images / (time.perf_counter() - start))
        losses.append(statistics.fmean(epoch_loss))
    return statistics.median(per_epoch[1:] or per_epoch), losses


def throughput(bench: Bench) -> dict[str, Any]:
    args, rows = bench.args, {}
    folder = bench.out / "throughput"
    folder.mkdir(parents=True, exist_ok=True)
    for arch in args.archs:
        overrides = throughput_overrides(args, arch)
        fw, plain, losses = [], [], []
        for r in range(args.tp_rounds):
            tmp = tempfile.mkdtemp(prefix=f"{arch}_r{r}_", dir=folder)  # measured afresh every time, never kept
            cfg = compose_stage("pretrain", [*overrides, f"run_dir={tmp}"])
            order = ("framework", "plain") if r % 2 == 0 else ("plain", "framework")  # load drift hits both alike
            got = {}
            for which in order:
                if which == "framework":
                    got[which] = bench.timed(f"throughput {arch} round {r} framework", framework_rate, cfg)
                else:
                    got[which] = bench.timed(f"throughput {arch} round {r} plain", plain_rate, cfg, args.tp_epochs,
                                             args.tp_batches)
            fw.append(got["framework"][0])
            plain.append(got["plain"][0])
            losses.append({"framework": got["framework"][1], "plain": got["plain"][1]})
            print(f"[bench_ssl] throughput {arch} round {r + 1}/{args.tp_rounds}: framework {fw[-1]:.1f} img/s, "
                  f"plain {plain[-1]:.1f} img/s", flush=True)
            shutil.rmtree(tmp)
        # each round's two rates share that round's machine load: the median of the per-round ratios is the figure
        rows[arch] = {"framework": statistics.median(fw), "plain": statistics.median(plain),
                      "ratio": statistics.median(f / p for f, p in zip(fw, plain, strict=True)),
                      "ratio_of_medians": statistics.median(fw) / statistics.median(plain), "framework_runs": fw,
                      "plain_runs": plain, "overrides": overrides,
                      # the same computation: the same per-epoch losses (seed, weights, data order, crops)
                      "epoch_losses": losses}
    return rows


# ---------------------------------------------------------------------------------------------------- report

def targets(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Each issue #13 target with the measured figure and whether it is met (None: not measured in this run)."""
    out: dict[str, Any] = {}
    feats = results.get("features") or {}
    for arch in args.archs:
        row = feats.get(f"DINO {arch}")
        for protocol in ("knn", "linear"):
            value = row[protocol]["mean"] if row else None
            out[f"DINO {arch} {protocol} >= {TARGETS[f'dino_{protocol}']}"] = {
                "value": value, "met": None if value is None else value >= TARGETS[f"dino_{protocol}"]}
    reg = results.get("regional") or {}
    try:
        goal = reg["supervised"]["sizes"][100]["accuracy"]["mean"]
        value = reg["DINO + regional"]["sizes"][50]["accuracy"]["mean"]
    except KeyError:
        goal = value = None
    out["DINO + regional at n=50 >= supervised base at n=100"] = {
        "value": value, "goal": goal, "met": None if value is None else value >= goal}
    for arch, row in (results.get("throughput") or {}).items():
        out[f"DINO {arch} framework / plain images/s >= {TARGETS['throughput_ratio']}"] = {
            "value": row["ratio"], "met": row["ratio"] >= TARGETS["throughput_ratio"]}
    return out


def _pm(s: dict[str, Any]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f} ({s['n']})" if s["n"] > 1 else f"{s['mean']:.4f}"


def markdown(results: dict[str, Any], pieces: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = []
    feats = results.get("features")
    if feats:
        raw = feats["raw pixels"]
        reported = f" (reported {RAW_1NN_REPORTED})" if args.data == FEATURE_DATA and not args.data_override else ""
        lines += [f"### Features: {' '.join(feature_data(args))} test ({raw['test']} images), bank / probe on train "
                  f"({raw['bank']})",
                  "", "| features | arch | kNN k=20 (mean ± std (seeds)) | linear probe |", "|---|---|---:|---:|",
                  f"| raw pixels | - | {raw['knn']:.4f} | {raw['linear']:.4f} |",
                  f"| raw pixels, 1-NN{reported} | - | {raw['nn1']:.4f} | - |"]
        lines += [f"| {r['kind']} | {r['arch']} | {_pm(r['knn'])} | {_pm(r['linear'])} |"
                  for key, r in feats.items() if key != "raw pixels"]
        lines.append("")
    reg = results.get("regional")
    if reg:
        lines += [f"### LoRA on {REGION_DATA} test, mean ± std over seeds {args.seeds}", "",
                  "| base | " + " | ".join(f"n={n}" for n in args.sizes) + " |",
                  "|---|" + "---:|" * len(args.sizes)]
        lines += [f"| {arm} | " + " | ".join(_pm(row["sizes"][n]["accuracy"]) for n in args.sizes) + " |"
                  for arm, row in reg.items()]
        lines.append("")
    tp = results.get("throughput")
    if tp:
        lines += [f"### DINO training throughput (images/s, batch {args.tp_batch_size}, {args.tp_batches} batches x "
                  f"{args.tp_epochs} epochs, first dropped; median of {args.tp_rounds} rounds)", "",
                  "| arch | framework | plain PyTorch | ratio |", "|---|---:|---:|---:|"]
        lines += [f"| {a} | {r['framework']:.1f} | {r['plain']:.1f} | {r['ratio']:.3f} |" for a, r in tp.items()]
        lines.append("")
    lines += ["### Targets", ""]
    for name, t in results["targets"].items():
        state = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        goal = f" (goal {t['goal']:.4f})" if t.get("goal") is not None else ""
        lines.append(f"- {name}: {value}{goal}: {state}")
    lines += ["", "### Wall time", "", "| piece | seconds | |", "|---|---:|---|"]
    lines += [f"| {p['piece']} | {'-' if p['seconds'] is None else p['seconds']} | "
              f"{'kept from an earlier run' if p['reused'] else ''} |" for p in pieces]
    return "\n".join(lines)


def machine(load_start: tuple[float, ...]) -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes: 1 seed, 1 epoch, a few steps")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--archs", nargs="+", choices=list(ARCHS), default=["resnet18", "vit_tiny"])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="LoRA calibration sizes (default 25 50 100; --quick: 50 100, the target's pair)")
    p.add_argument("--dino-epochs", type=int, default=None, help="default 20 (--quick: 1)")
    p.add_argument("--sup-epochs", type=int, default=None, help="default experiment=demo's (6); --quick: 1")
    p.add_argument("--regional-epochs", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument("--dino-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for every DINO pretrain (repeatable)")
    p.add_argument("--dino-model", action="append", default=[], metavar="ARCH=PATH",
                   help="score this DINO model (a pretrain run dir) instead of training one")
    p.add_argument("--supervised-model", default=None, metavar="PATH",
                   help="score this supervised ResNet-18 (a pretrain run dir) instead of training one")
    p.add_argument("--data", default=FEATURE_DATA, help=f"the features section's recipe (default {FEATURE_DATA})")
    p.add_argument("--data-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override of that recipe, e.g. data.limit=12000 (repeatable)")
    p.add_argument("--tp-rounds", type=int, default=None, help="throughput rounds (default 3; --quick: 2)")
    p.add_argument("--tp-epochs", type=int, default=None, help="epochs per throughput run, the first dropped "
                                                               "(default 3; --quick: 2)")
    p.add_argument("--tp-batches", type=int, default=None, help="batches per throughput epoch (default 10; --quick: 2)")
    p.add_argument("--tp-batch-size", type=int, default=None, help="default 128, the loader's (--quick: 16)")
    p.add_argument("--out", type=Path, default=None, help="default outputs/bench/ssl (--quick: outputs/bench/ssl_quick)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"seeds": [0] if q else [0, 1, 2], "sizes": [50, 100] if q else [25, 50, 100], "dino_epochs": 1 if q else 20, "sup_epochs": 1 if q else None,
                "regional_epochs": 1 if q else 3, "tp_rounds": 2 if q else 3, "tp_epochs": 2 if q else 3,
                "tp_batches": 2 if q else 10, "tp_batch_size": 16 if q else 128,
                "out": ROOT / "outputs" / "bench" / ("ssl_quick" if q else "ssl")}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.quick_batches, args.quick_steps = 3, 10
    models = {}
    for item in args.dino_model:
        arch, sep, path = item.partition("=")
        if not sep or arch not in ARCHS:
            p.error(f"--dino-model {item!r}: expected ARCH=PATH with ARCH one of {', '.join(ARCHS)}")
        models[arch] = path
    args.dino_model = models
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    bench, results = Bench(args), {}
    started = time.perf_counter()
    for section, fn in (("features", features), ("regional", regional), ("throughput", throughput)):
        if section in args.sections:
            results[section] = fn(bench)
    results["targets"] = targets(results, args)
    table = markdown(results, bench.pieces, args)
    report = {"results": results, "pieces": bench.pieces, "total_seconds": round(time.perf_counter() - started, 1),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "commands": {"supervised": supervised_overrides(args),
                           "dino": {a: dino_overrides(args, a, args.dino_epochs) for a in args.archs},
                           "random_init": {a: dino_overrides(args, a, 0) for a in args.archs}},
              "machine": machine(load_start)}
    (args.out / "bench_ssl.md").write_text(table + "\n")
    (args.out / "bench_ssl.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("\n" + table + f"\n\ntotal {report['total_seconds']:.0f} s; wrote {args.out / 'bench_ssl.md'}, "
          f"{args.out / 'bench_ssl.json'}")
    return report


if __name__ == "__main__":
    main()
