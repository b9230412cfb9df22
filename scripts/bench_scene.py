"""Benchmark of "process only when the scene changed" (``predict scene.enabled=true``) on sequences of real images.

    python scripts/bench_scene.py --model outputs/export/<run>/model.int8.onnx
    python scripts/bench_scene.py --model <model.onnx> --sets mnist_global --sites 10 --frames 40

For each real recipe (mnist_global: MNIST 28x28; uci_digits_region: UCI digits 8x8, written at the recipe's 28x28
with the recipe's bilinear upsampling, so that a 1-pixel shift is 1/28 of the image on both), the test split's
images build --sites sequences of --frames frames. Each site starts on a random image; each next frame is, with
probability --p-change, another image of the split (a real change), else the current image again: exactly, with
Gaussian pixel noise (sigma 0.02 or 0.05), a brightness/contrast change (x0.8..1.2), or shifted by one pixel. Frames
are written as 8-bit PNGs with a manifest (path, site, order), then:

- the threshold's basis: quantiles of the signature distance between different images of the split;
- ``predict`` with the scene gate and ``scene.verify=true``: the fraction skipped (and how many frames were
  processed because their site's last prediction was under ``--min-confidence``), and the agreement of every reused
  prediction with the model's own prediction on that frame, overall and per kind of frame;
- ``predict`` with and without the gate, timed end to end (best of --repeats): the wall time saved, beside the
  model time avoided and the change tests' cost that the gate reports.

Writes bench_scene.json and bench_scene.md under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("repeat", "noise", "brightness", "shift", "change")


def split_images(name: str, split: str = "test") -> np.ndarray:
    """(n, 28, 28) float32 in [0, 1]: the recipe's split, as its images are read (uci: upsampled bilinear)."""
    from omegaconf import OmegaConf

    from fmtransfer.config import config_dir
    from fmtransfer.data.recipe import load_recipe
    from fmtransfer.data.table import build_table
    from fmtransfer.export.predict import resize_bilinear

    recipe = load_recipe(OmegaConf.load(Path(config_dir()) / "data" / f"{name}.yaml"))
    table = build_table(recipe)
    size = tuple(recipe.image_size)
    return np.stack([resize_bilinear(table.images[i], size)[:, :, 0] for i in table.indices(split)])


def perturb(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "repeat":
        return img
    if kind == "noise":
        return np.clip(img + rng.normal(0, rng.choice([0.02, 0.05]), img.shape), 0, 1)
    if kind == "brightness":
        return np.clip(img * rng.uniform(0.8, 1.2) + rng.uniform(-0.05, 0.05), 0, 1)
    if kind == "shift":
        axis, step = int(rng.integers(0, 2)), int(rng.choice([-1, 1]))
        return np.roll(img, step, axis=axis)
    raise ValueError(kind)


def build_sequences(images: np.ndarray, folder: Path, sites: int, frames: int, p_change: float,
                    seed: int) -> tuple[Path, dict[str, str]]:
    """Frames as PNG files and a manifest; returns it and each frame's kind by path."""
    rng = np.random.default_rng(seed)
    rows, kinds = [], {}
    for s in range(sites):
        current = int(rng.integers(len(images)))
        for t in range(frames):
            if t == 0:
                kind = "change"
            elif rng.random() < p_change:
                kind, current = "change", int((current + rng.integers(1, len(images))) % len(images))
            else:
                kind = str(rng.choice(KINDS[:-1]))
            img = images[current] if kind == "change" else perturb(images[current], kind, rng)
            path = folder / f"site{s:03d}" / f"{t:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(path)
            rows.append((str(path.relative_to(folder)), f"site{s:03d}", t))
            kinds[str(path)] = kind
    manifest = folder / "frames.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "site", "order"])
        w.writerows(rows)
    return manifest, kinds


def distance_quantiles(images: np.ndarray, size: int, seed: int, pairs: int = 20000) -> dict[str, float]:
    from fmtransfer.export.scene import signature

    sigs = np.stack([signature(img, size) for img in images])
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(sigs), pairs), rng.integers(0, len(sigs), pairs)
    keep = i != j
    d = np.sqrt(((sigs[i[keep]] - sigs[j[keep]]) ** 2).mean(1))
    return {f"q{q:g}": float(np.quantile(d, q)) for q in (0.001, 0.01, 0.05, 0.5)}


def per_kind(output: Path, kinds: dict[str, str]) -> dict[str, dict[str, float]]:
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    table = {}
    for kind in KINDS:
        mine = [r for r in rows if kinds[r["path"]] == kind]
        reused = [r for r in mine if r["reused_from"]]
        agree = [r["prediction"] == r["full_prediction"] for r in reused]
        table[kind] = {"frames": len(mine), "skipped_fraction": len(reused) / len(mine) if mine else 0.0,
                       "agreement": float(np.mean(agree)) if agree else None}
    return table


def timed(model: str, manifest: Path, out: Path, settings, repeats: int) -> tuple[float, dict]:
    from fmtransfer.export.predict import predict_files

    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = predict_files(model, manifest, out, progress=False, scene=settings)
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_set(name: str, model: str, args: argparse.Namespace, work: Path) -> dict:
    from fmtransfer.export.scene import SceneSettings

    images = split_images(name)
    manifest, kinds = build_sequences(images, work / name, args.sites, args.frames, args.p_change, args.seed)
    keys = {"threshold": args.threshold, "min_confidence": args.min_confidence, "size": args.size}
    gate = SceneSettings(max_skips=args.max_skips, **keys)
    verified = SceneSettings(max_skips=args.max_skips, verify=True, **keys)
    full = SceneSettings(max_skips=0, **keys)  # every frame through the model
    check = timed(model, manifest, work / f"{name}_verify.csv", verified, 1)[1]
    gated_s, gated = timed(model, manifest, work / f"{name}_gated.csv", gate, args.repeats)
    full_s, _ = timed(model, manifest, work / f"{name}_full.csv", full, args.repeats)
    scene = gated["scene"]
    return {"recipe": name, "split_images": len(images), "frames": scene["frames"], "sites": scene["sites"],
            "distance_between_different_images": distance_quantiles(images, args.size, args.seed),
            "skipped_fraction": scene["skipped_fraction"],
            "processed_for_low_confidence": scene["processed_for_low_confidence"], "agreement": check["scene"]["verify"]["agreement"],
            "disagreements": check["scene"]["verify"]["disagreements"],
            "per_kind": per_kind(work / f"{name}_verify.csv", kinds),
            "model_ms_per_frame": scene["model_ms_per_frame"], "change_test_ms_per_frame":
                scene["change_test_ms_per_frame"], "model_seconds_avoided": scene["model_seconds_avoided"],
            "change_test_seconds": scene["change_test_seconds"], "seconds_saved": scene["seconds_saved"],
            "wall_seconds_gated": gated_s, "wall_seconds_full": full_s,
            "wall_saved_fraction": 1 - gated_s / full_s}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# Scene gate: {args.sites} sites x {args.frames} frames, p_change {args.p_change}, threshold "
             f"{args.threshold}, min_confidence {args.min_confidence}, size {args.size}, max_skips {args.max_skips}, "
             f"model {args.model}", "",
             "| recipe | skipped (low-confidence re-runs) | agreement (reused vs full) | model ms/frame | change test ms/frame | "
             "model s avoided | change tests s | wall s full -> gated | different-image distance q0.001 / q0.01 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        q = r["distance_between_different_images"]
        lines.append(f"| {r['recipe']} | {r['skipped_fraction']:.3f} ({r['processed_for_low_confidence']}) | {r['agreement']:.4f} ({r['disagreements']} "
                     f"differ) | {r['model_ms_per_frame']:.2f} | {r['change_test_ms_per_frame']:.3f} | "
                     f"{r['model_seconds_avoided']:.2f} | {r['change_test_seconds']:.2f} | {r['wall_seconds_full']:.2f}"
                     f" -> {r['wall_seconds_gated']:.2f} ({r['wall_saved_fraction']:.0%} less) | "
                     f"{q['q0.001']:.3f} / {q['q0.01']:.3f} |")
    lines += ["", "| recipe | kind | frames | skipped | agreement of the skipped |", "|---|---|---|---|---|"]
    for r in results:
        for kind, k in r["per_kind"].items():
            agree = "-" if k["agreement"] is None else f"{k['agreement']:.4f}"
            lines.append(f"| {r['recipe']} | {kind} | {k['frames']} | {k['skipped_fraction']:.3f} | {agree} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from fmtransfer.export.scene import (
        DEFAULT_MAX_SKIPS,
        DEFAULT_MIN_CONFIDENCE,
        DEFAULT_SIZE,
        DEFAULT_THRESHOLD,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported .onnx (fmtransfer export)")
    p.add_argument("--sets", nargs="+", default=["mnist_global", "uci_digits_region"])
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--p-change", type=float, default=0.2)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE)
    p.add_argument("--max-skips", type=int, default=DEFAULT_MAX_SKIPS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "scene")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_scene_") as tmp:
        results = [bench_set(name, args.model, args, Path(tmp)) for name in args.sets]
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_scene.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench_scene.md").write_text(markdown(results, args))
    print(markdown(results, args))
    return report


if __name__ == "__main__":
    main()
