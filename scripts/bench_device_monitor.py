"""Monitoring on the device, measured: ``predict monitor.enabled=true`` with an exported model (onnxruntime, numpy).

    OMP_NUM_THREADS=1 python scripts/bench_device_monitor.py --export <export run dir> [--repeats 5]

The export run dir holds ``model.onnx`` / ``model.int8.onnx`` with their ``embedding`` output and the reference
statistics ``export`` stored in ``monitoring/``. Real images are written as PNG files, as a device would receive them:
mnist_global's test split (in distribution) and every uci_digits_region image (another writer and scanner, 8x8,
none seen in training). For each precision:

- the share of images flagged OOD on each set, and the AUROC of the per-image ``ood_score`` separating them;
- the drift verdicts of each set against the reference (the whole set as one batch);
- the latency: ``predict_files`` over the global set with and without monitoring, taking turns, ``--repeats`` times;
  the added time per image is the difference of the medians over the number of images (decoding the images and the
  model run are in both; the embedding output, the k-NN search and the drift tests are the difference).

Writes ``outputs/bench/device_monitor/results.json`` and ``results.md``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_images(name: str, split: str | None, folder: Path) -> int:
    """The recipe's images (``split``, or all of them) as 8-bit PNG files at their own size; returns the count."""
    from omegaconf import OmegaConf
    from PIL import Image

    from fmtransfer.config import config_dir
    from fmtransfer.data.recipe import load_recipe
    from fmtransfer.data.table import build_table

    table = build_table(load_recipe(OmegaConf.load(Path(config_dir()) / "data" / f"{name}.yaml")))
    rows = np.arange(len(table)) if split is None else table.indices(split)
    folder.mkdir(parents=True, exist_ok=True)
    for i in rows:
        img = (np.clip(table.images[i][:, :, 0], 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(img).save(folder / f"{int(i):05d}.png")
    return len(rows)


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(negative)), np.ones(len(positive))]
    return float(roc_auc_score(y, np.r_[negative, positive]))


def scores(csv_path: Path) -> np.ndarray:
    with open(csv_path) as f:
        return np.array([float(r["ood_score"]) for r in csv.DictReader(f)])


def run(model: Path, folder: Path, out: Path, monitor: dict | None):
    from fmtransfer.export.device_monitor import DeviceMonitorSettings
    from fmtransfer.export.predict import predict_files

    settings = DeviceMonitorSettings.from_dict(monitor) if monitor else None
    start = time.perf_counter()
    result = predict_files(model, folder, out, progress=False, monitor=settings)
    return time.perf_counter() - start, result


def bench_precision(model: Path, sets: dict[str, Path], work: Path, repeats: int, monitor: dict) -> dict:
    got = {}
    for name, folder in sets.items():
        _, result = run(model, folder, work / f"{model.stem}_{name}.csv", monitor)
        m = result["monitor"]
        got[name] = {"n": m["n"], "flagged": m["ood"]["share"], "estimated_accuracy": m["estimated_accuracy"],
                     "drift": {t: {"p_value": v["p_value"], "detected": v["detected"]} for t, v in m["drift"].items()},
                     "scores": scores(work / f"{model.stem}_{name}.csv")}
    out = {"threshold": m["ood"]["threshold"], "k": m["ood"]["k"], "bank": m["ood"]["bank"],
           "auroc": auroc(got["global_test"]["scores"], got["region"]["scores"])}
    for name in sets:
        got[name].pop("scores")
    out.update(got)
    plain, monitored, parts = [], [], []
    for _ in range(repeats):  # taking turns, so machine load hits both alike
        plain.append(run(model, sets["global_test"], work / "plain.csv", None)[0])
        seconds, result = run(model, sets["global_test"], work / "mon.csv", monitor)
        monitored.append(seconds)
        parts.append(result["monitor"]["seconds"])
    n = got["global_test"]["n"]
    out["latency"] = {"images": n, "repeats": repeats, "plain_s": float(np.median(plain)),
                      "monitored_s": float(np.median(monitored)),
                      "added_ms_per_image": 1000 * (float(np.median(monitored)) - float(np.median(plain))) / n,
                      "plain_ms_per_image": 1000 * float(np.median(plain)) / n,
                      "ood_ms_per_image": 1000 * float(np.median([p["ood"] for p in parts])) / n,
                      "drift_s_per_batch": float(np.median([p["drift"] for p in parts]))}
    return out


def markdown(results: dict) -> str:
    lines = ["| model | AUROC | flagged global test | flagged region | drift detected on global test | drift detected "
             "on region | predict ms/image | added by monitoring ms/image (OOD k-NN; drift tests per batch) |",
             "|---|---:|---:|---:|---|---|---:|---|"]
    for precision, r in results["precisions"].items():
        det = {s: ", ".join(t for t, v in r[s]["drift"].items() if v["detected"]) or "none"
               for s in ("global_test", "region")}
        lat = r["latency"]
        lines.append(f"| {precision} | {r['auroc']:.3f} | {r['global_test']['flagged']:.3f} | "
                     f"{r['region']['flagged']:.3f} | {det['global_test']} | {det['region']} | "
                     f"{lat['plain_ms_per_image']:.2f} | {lat['added_ms_per_image']:.2f} ({lat['ood_ms_per_image']:.2f}; "
                     f"{lat['drift_s_per_batch']:.2f} s per {lat['images']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="an export run dir (model.onnx, monitoring/)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--permutations", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "device_monitor")
    args = parser.parse_args(argv)
    monitor = {"enabled": True, "reference": None, "alpha": 0.05,
               "tests": ["bbsd", "mmd", "domain_classifier", "label_shift"], "permutations": args.permutations,
               "window": None}
    results: dict = {"export": str(args.export), "precisions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {"global_test": work / "global_test", "region": work / "region"}
        results["images"] = {"global_test": write_images("mnist_global", "test", sets["global_test"]),
                             "region": write_images("uci_digits_region", None, sets["region"])}
        for precision, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
            if (args.export / file).is_file():
                results["precisions"][precision] = bench_precision(args.export / file, sets, work, args.repeats,
                                                                   monitor)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
