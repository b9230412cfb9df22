"""Monitoring on real data: false alarms, power, gradual drift, OOD AUROC, the accuracy estimate and throughput.

    OMP_NUM_THREADS=1 python scripts/bench_monitor.py --model /work/s8/global

The model's outputs are computed ONCE (global: mnist_global val + test; region: every uci_digits_region sample, all
unseen by the global model), then arrays are resampled. Per trial the global pool (val + test) is split at random
into a reference of --reference samples and a held-out rest, as `fmtransfer monitor` would see them: the embedding
tests fit their PCA on a random half of the reference and compare the other half.

- false alarms: current = n held-out global samples; rate of detections per test over --trials trials (target <= 5%).
- power: current = n region samples; detection rate per n (target >= 0.9 at n=100 for the best test).
- gradual drift: n=200 current samples, a share of them from the region (0, 5, 10, 25, 50%); detection rate per level.
- OOD: AUROC of the k-NN score separating global test samples from region samples (target >= 0.95), with the
  stage's default (bank: the global train split, k=50 scaled to the bank's size) and the alternatives (the val
  split as the bank; k=50 unscaled).
- accuracy estimate: temperature fitted on global val; |estimate - truth| on global test (target <= 3 points) and on
  the region zero-shot.
- throughput: the model's forward passes (PyTorch; ONNX fp32 of the same model exported here with a second
  'embedding' output), the monitoring statistics on a window of 200, and the two together, in samples/s.
Second real sets (with --heldout / --new-crop, on by default when their files exist; `python
scripts/get_real_data.py` makes them):
- mnist_heldout (MNIST digits no global model saw, from another package), reference = the global pool as above:
  as it is, its class mix differs from mnist_global's even 10% (5: 7.3% ... 1: 12.5%), a mild real label shift, so
  its detection rates are power against a small shift; with every class cut to the smallest class's count
  (seeded), it is a false-alarm check on real data from another copy.
- power and OOD on a new crop: current = n samples of fashion_mnist's test split (10 clothing classes).
- accuracy estimate on mnist_heldout (in distribution, independent of the val split the temperature saw).
Sample sizes follow Failing Loudly (Rabanser et al. 2019): 10, 20, 50, 100, 200, 500, 1000, capped by the data.
Writes bench_monitor.json, bench_monitor.md and the plots under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID = (10, 20, 50, 100, 200, 500, 1000)
LEVELS = (0.0, 0.05, 0.10, 0.25, 0.50)
TESTS = ("bbsd", "mmd", "domain_classifier", "label_shift")


def outputs_once(model: str, batch_size: int, extra: dict[str, tuple[str, str]]) -> dict:
    """The model's outputs on the global val, test and train splits, on every region sample, and on each of
    ``extra`` (key -> (recipe, split))."""
    from fmtransfer.tasks.model_outputs import open_model

    runner = open_model(model)
    glob, region = _recipe("mnist_global"), _recipe("uci_digits_region")
    got = {"global_val": runner.outputs(glob, "val", batch_size=batch_size, accelerator="cpu"),
           "global_test": runner.outputs(glob, "test", batch_size=batch_size, accelerator="cpu"),
           "global_train": runner.outputs(glob, "train", batch_size=batch_size, accelerator="cpu"),
           "region": runner.outputs(region, "all", batch_size=batch_size, accelerator="cpu")}
    for key, (name, split) in extra.items():
        got[key] = runner.outputs(_recipe(name), split, batch_size=batch_size, accelerator="cpu")
    return {"runner": runner, **got}


def _has_file(name: str) -> bool:
    """Whether recipe ``name``'s npz file exists (the sets scripts/get_real_data.py makes)."""
    try:
        return Path(_recipe(name).source["path"]).expanduser().is_file()
    except Exception:  # noqa: BLE001 - an unknown recipe counts as absent
        return False


def _recipe(name: str):
    from fmtransfer.config import compose_stage
    from fmtransfer.data import load_recipe

    return load_recipe(compose_stage("evaluate", [f"data={name}"]).data)


def trial_tests(ref_p, ref_e, cur_p, cur_e, seed: int, permutations: int) -> dict[str, bool]:
    from fmtransfer.monitoring.drift import held_out_pca, run_tests

    pca, compared = held_out_pca(ref_e, 32, seed)
    verdicts = run_tests({"probs": ref_p, "embeddings": compared}, {"probs": cur_p, "embeddings": cur_e},
                         alpha=0.05, pca=pca, permutations=permutations, seed=seed)
    return {k: bool(v.detected) for k, v in verdicts.items()}


def detection_rates(pool_p, pool_e, source, n_ref: int, sizes, trials: int, permutations: int,
                    mix: bool = False, n_mix: int = 200) -> dict:
    """Per size (or mix level): the share of trials each test detects drift.

    ``source``: None (current from the held-out global rest), or (probs, embeddings) of the region; ``mix``: the
    ``mix``: ``sizes`` are region shares of an ``n_mix``-sample current set (gradual drift).
    """
    rates = {}
    for size in sizes:
        hits = {t: 0 for t in TESTS}
        for trial in range(trials):
            rng = np.random.default_rng(1000 * trial + 7)
            perm = rng.permutation(len(pool_p))
            ref, rest = perm[:n_ref], perm[n_ref:]
            if mix:
                k = int(round(size * n_mix))
                g = rng.choice(rest, n_mix - k, replace=False)
                r = rng.choice(len(source[0]), k, replace=False)
                cur_p = np.concatenate([pool_p[g], source[0][r]])
                cur_e = np.concatenate([pool_e[g], source[1][r]])
            elif source is None:
                c = rng.choice(rest, size, replace=False)
                cur_p, cur_e = pool_p[c], pool_e[c]
            else:
                c = rng.choice(len(source[0]), size, replace=False)
                cur_p, cur_e = source[0][c], source[1][c]
            for t, hit in trial_tests(pool_p[ref], pool_e[ref], cur_p, cur_e, trial, permutations).items():
                hits[t] += hit
        rates[size] = {t: hits[t] / trials for t in TESTS}
        print(f"  {size}: " + "  ".join(f"{t} {rates[size][t]:.2f}" for t in TESTS), flush=True)
    return rates


def balanced_rows(targets: np.ndarray, seed: int) -> np.ndarray:
    """Rows with every class cut to the smallest class's count (a seeded pick), sorted."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(targets, return_counts=True)
    least = int(counts.min())
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(targets == c), least, replace=False) for c in classes]))


def ood_auroc(bank: np.ndarray, inside: np.ndarray, outside: np.ndarray, k: int = 50, scale_k: bool = True) -> dict:
    from sklearn.metrics import roc_auc_score

    from fmtransfer.monitoring.ood import KnnOod

    ood = KnnOod.fit(bank, k=k, scale_k=scale_k)
    s_in, s_out = ood.score(inside), ood.score(outside)
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    return {"auroc": float(roc_auc_score(y, np.r_[s_in, s_out])), "bank": len(bank), "k": ood.k,
            "flagged_in": float(ood.flags(s_in).mean()), "flagged_out": float(ood.flags(s_out).mean())}


def accuracy_estimates(val, test, region, heldout=None) -> dict:
    from fmtransfer.monitoring.calibration import estimated_accuracy, fit_temperature

    t = fit_temperature(val.probs, val.targets)
    out = {"temperature": t}
    pairs = [("global_test", test), ("region_zero_shot", region)] + ([("mnist_heldout", heldout)] if heldout else [])
    for name, o in pairs:
        est, raw = estimated_accuracy(o.probs, t), estimated_accuracy(o.probs, 1.0)
        out[name] = {"true": o.accuracy, "estimated": est, "abs_error_points": 100 * abs(est - o.accuracy),
                     "uncalibrated": raw, "uncalibrated_abs_error_points": 100 * abs(raw - o.accuracy)}
    return out


def export_onnx_with_embedding(runner, folder: Path) -> Path:
    """The model as ONNX fp32 with outputs 'logits' and 'embedding' (``export_onnx(embedding=True)``, what
    ``fmtransfer export`` writes with ``export.embedding_output=true``), its metadata sealed as export seals it; no
    INT8 and no gates (``fmtransfer export`` and scripts/bench_device_monitor.py measure those)."""
    import torch

    from fmtransfer.export.onnx_export import embed_metadata, export_onnx, output_names
    from fmtransfer.export.runtime import ONNX_FORMAT, ONNX_FORMAT_VERSION

    meta = runner.meta
    pre = meta["preprocess"]
    path = folder / "model.onnx"
    sample = torch.zeros(2, int(pre["channels"]), *pre["image_size"])
    export_onnx(runner.model.cpu().eval(), sample, path, task=meta["task"], embedding=True)
    embed_metadata(path, {"format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "task": meta["task"],
                          "classes": meta["classes"], "num_outputs": int(meta["num_outputs"]), "preprocess": pre,
                          "input_name": "input", "output_name": "logits",
                          "output_names": output_names(meta["task"], True), "backbone": meta["backbone"]["name"],
                          "gates_passed": True, "gates": [], "note": "bench_monitor's own export (fp32, no gates)"})
    return path


def throughput(runner, got: dict, permutations: int, onnx: bool, batch_size: int) -> dict:
    from fmtransfer.monitoring.drift import held_out_pca, run_tests
    from fmtransfer.monitoring.ood import KnnOod
    from fmtransfer.tasks.model_outputs import open_model

    test = got["global_test"]
    result = {"torch_forward_samples_per_s": len(test) / test.seconds}
    ref_p, ref_e = got["global_val"].probs, got["global_val"].embeddings
    pca, compared = held_out_pca(ref_e, 32, 0)
    ood = KnnOod.fit(got["global_train"].embeddings)
    cur_p, cur_e = got["region"].probs[:200], got["region"].embeddings[:200]
    times = []
    for seed in range(5):
        start = time.perf_counter()
        run_tests({"probs": ref_p, "embeddings": compared}, {"probs": cur_p, "embeddings": cur_e}, pca=pca,
                  permutations=permutations, seed=seed)
        ood.score(cur_e)
        times.append(time.perf_counter() - start)
    stats_s = float(np.median(times))
    result["statistics_window"] = 200
    result["statistics_seconds_per_window"] = stats_s
    result["statistics_samples_per_s"] = 200 / stats_s
    result["torch_end_to_end_samples_per_s"] = 200 / (200 / result["torch_forward_samples_per_s"] + stats_s)
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx_with_embedding(runner, Path(tmp))
            onnx_runner = open_model(path)
            o = onnx_runner.outputs(_recipe("mnist_global"), "test", batch_size=batch_size)
            result["onnx_forward_samples_per_s"] = len(o) / o.seconds
            result["onnx_max_abs_prob_diff"] = float(np.abs(o.probs - test.probs).max())
            result["onnx_max_abs_embedding_diff"] = float(np.abs(o.embeddings - test.embeddings).max())
            result["onnx_end_to_end_samples_per_s"] = 200 / (200 / result["onnx_forward_samples_per_s"] + stats_s)
    return result


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a binomial rate measured over ``n`` trials."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def above_alpha(rates: dict, trials: int, alpha: float = 0.05) -> list[str]:
    """The cells (n, test) whose 95% Wilson interval lies wholly above ``alpha``: false-alarm rates that the trials
    show to be too high, rather than within the binomial noise of ``trials`` trials."""
    return [f"n={n} {t}" for n, row in rates.items() for t in TESTS if wilson(row[t], trials)[0] > alpha]


def table(rates: dict, label: str, trials: int | None = None) -> list[str]:
    """Rates per row; with ``trials``, a last row pooling every row (rate and 95% Wilson interval)."""
    lines = [f"| {label} | " + " | ".join(TESTS) + " |", "|---:|" + "---:|" * len(TESTS)]
    for key, row in rates.items():
        lines.append(f"| {key} | " + " | ".join(f"{row[t]:.3f}" if trials else f"{row[t]:.2f}" for t in TESTS)
                     + " |")
    if trials:
        pooled = {t: float(np.mean([row[t] for row in rates.values()])) for t in TESTS}
        n = trials * len(rates)
        cells = [f"{pooled[t]:.3f} [{wilson(pooled[t], n)[0]:.3f}, {wilson(pooled[t], n)[1]:.3f}]" for t in TESTS]
        lines.append(f"| all ({n}) | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the global model: a run dir (read only)")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--power-trials", type=int, default=50)
    ap.add_argument("--reference", type=int, default=500, help="reference samples per trial (of the global pool)")
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--heldout", default="mnist_heldout", help="a recipe from the global distribution that no "
                    "global model saw (false alarms on real data from another copy); 'none' to skip")
    ap.add_argument("--new-crop", default="fashion_mnist", help="a recipe with other classes (power and OOD on a "
                    "second shift; its test split); 'none' to skip")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "monitor"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    extra = {}
    for key, name, split in (("heldout", args.heldout, "all"), ("new_crop", args.new_crop, "test")):
        if name != "none" and _has_file(name):
            extra[key] = (name, split)
        elif name != "none":
            print(f"{name}: no data file; run python scripts/get_real_data.py (skipped)", flush=True)
    got = outputs_once(args.model, args.batch_size, extra)
    runner = got.pop("runner")
    val, test, region = got["global_val"], got["global_test"], got["region"]
    pool_p = np.concatenate([val.probs, test.probs])
    pool_e = np.concatenate([val.embeddings, test.embeddings])
    rest = len(pool_p) - args.reference
    print(f"outputs: global val {len(val)}, test {len(test)}, train {len(got['global_train'])}; region {len(region)}"
          f" ({time.perf_counter() - started:.0f} s)", flush=True)
    print("false alarms (same distribution):", flush=True)
    false_alarms = detection_rates(pool_p, pool_e, None, args.reference, [n for n in GRID if n <= rest],
                                   args.trials, args.permutations)
    print("power (global vs region):", flush=True)
    power = detection_rates(pool_p, pool_e, (region.probs, region.embeddings), args.reference,
                            [n for n in GRID if n <= len(region)], args.power_trials, args.permutations)
    print("gradual drift (n=200):", flush=True)
    gradual = detection_rates(pool_p, pool_e, (region.probs, region.embeddings), args.reference, list(LEVELS),
                              args.power_trials, args.permutations, mix=True)
    second = {}

    def on_grid(label: str, pool: tuple, current, rows: np.ndarray, trials: int) -> dict:
        """Detection rates at every n of the grid that ``rows`` of ``current`` can fill."""
        print(f"{label} ({len(rows)} samples):", flush=True)
        return detection_rates(*pool, (current.probs[rows], current.embeddings[rows]), args.reference,
                               [n for n in GRID if n <= len(rows)], trials, args.permutations)

    if "heldout" in got:
        h = got["heldout"]
        second["false_alarms_heldout"] = on_grid(f"current from {args.heldout}", (pool_p, pool_e), h,
                                                 np.arange(len(h)), args.trials)
        even = balanced_rows(h.targets, seed=0)
        second["false_alarms_heldout_even"] = on_grid(f"false alarms, current from {args.heldout} with even "
                                                      f"classes", (pool_p, pool_e), h, even, args.trials)
        second["heldout_class_shares"] = np.bincount(h.targets, minlength=h.probs.shape[1]).tolist()
        # within the copy: the reference from one random half of the even rows, the current from the other
        halves = np.random.default_rng(1).permutation(even)
        a, b = halves[: len(halves) // 2], halves[len(halves) // 2:]
        second["false_alarms_within_heldout"] = on_grid(f"false alarms within {args.heldout} (even classes, "
                                                        f"reference pool {len(a)})", (h.probs[a], h.embeddings[a]),
                                                        h, b, args.trials)
    if "new_crop" in got:
        c = got["new_crop"]
        second["power_new_crop"] = on_grid(f"power, global vs {args.new_crop}", (pool_p, pool_e), c,
                                           np.arange(len(c)), args.power_trials)
    ood = {}
    if "new_crop" in got:
        ood[f"global train, k=50 scaled: global test vs {args.new_crop} test"] = ood_auroc(
            got["global_train"].embeddings, test.embeddings, got["new_crop"].embeddings)
    for bank_name, bank in (("global train (the default bank)", got["global_train"].embeddings),
                            ("global val", val.embeddings)):
        for k, scale in ((50, True), (50, False)):
            ood[f"{bank_name}, k=50{' scaled' if scale else ''}"] = ood_auroc(bank, test.embeddings,
                                                                               region.embeddings, k, scale)
    accuracy = accuracy_estimates(val, test, region, got.get("heldout"))
    speed = throughput(runner, got, args.permutations, not args.no_onnx, args.batch_size)
    pooled = {t: float(np.mean([row[t] for row in false_alarms.values()])) for t in TESTS}
    result = {"model": runner.identity, "false_alarms_pooled": pooled, "trials": args.trials, "power_trials": args.power_trials,
              "reference_per_trial": args.reference, "permutations": args.permutations, "alpha": 0.05,
              "false_alarms": false_alarms, "power": power, "gradual_drift_n200": gradual, "ood": ood,
              "accuracy_estimate": accuracy, "throughput": speed, "heldout": args.heldout,
              "new_crop": args.new_crop, **second,
              "false_alarm_cells_above_alpha": above_alpha(false_alarms, args.trials),
              "heldout_cells_above_alpha": above_alpha(second.get("false_alarms_heldout", {}), args.trials),
              "false_alarm_cells_above_alpha_heldout_even": above_alpha(second.get("false_alarms_heldout_even", {}),
                                                                       args.trials), "seconds": time.perf_counter() - started,
              "command": " ".join(["OMP_NUM_THREADS=1", "python", *sys.argv])}
    (out / "bench_monitor.json").write_text(json.dumps(result, indent=2, default=str))
    from fmtransfer.plots import rates_png

    rates_png(list(power), {t: [power[n][t] for n in power] for t in TESTS}, out / "power.png",
              "detection rate, global reference vs region current", "current samples n", 0.9, log_x=True)
    rates_png([100 * s for s in gradual], {t: [gradual[s][t] for s in gradual] for t in TESTS}, out / "gradual.png",
              "gradual drift: region share of n=200 current samples", "region share (%)")
    rates_png(list(false_alarms), {t: [false_alarms[n][t] for n in false_alarms] for t in TESTS},
              out / "false_alarms.png", "false alarms, same distribution", "current samples n", 0.05, log_x=True)
    md = [f"# bench_monitor ({result['command']})", "", f"Model {runner.identity['path']} (sha256 "
          f"{runner.identity['sha256'][:12]}...), alpha 0.05, reference {args.reference} global samples per trial, "
          f"{args.permutations} MMD permutations, {time.perf_counter() - started:.0f} s.", "",
          f"## False alarms ({args.trials} trials)", "", *table(false_alarms, "n", args.trials), "",
          f"A rate over {args.trials} trials has a 95% interval of about "
          f"+-{100 * (wilson(0.05, args.trials)[1] - 0.05):.1f} points around 5%; the last row pools every n (Wilson "
          f"interval). Cells whose own Wilson interval lies wholly above 5%: "
          f"{', '.join(result['false_alarm_cells_above_alpha']) or 'none'}.", "",
          *([f"## False alarms, current from {args.heldout} with even classes ({args.trials} trials)", "",
             *table(second["false_alarms_heldout_even"], "n", args.trials), "",
             "Cells whose Wilson interval lies wholly above 5%: "
             f"{', '.join(result['false_alarm_cells_above_alpha_heldout_even']) or 'none'}.", "",
             f"## False alarms within {args.heldout} (even classes; reference from one half, current from the "
             f"other; {args.trials} trials)", "", *table(second["false_alarms_within_heldout"], "n", args.trials), "",
             "Cells whose Wilson interval lies wholly above 5%: "
             f"{', '.join(above_alpha(second['false_alarms_within_heldout'], args.trials)) or 'none'}.", "",
             f"## A mild real shift: {args.heldout} as it is ({args.trials} trials)", "",
             f"Its class counts {second['heldout_class_shares']} against mnist_global's even 500 each.", "",
             *table(second["false_alarms_heldout"], "n", args.trials), ""]
            if "false_alarms_heldout" in second else []),
          *([f"## Power, global vs {args.new_crop} ({args.power_trials} trials)", "",
             *table(second["power_new_crop"], "n"), ""] if "power_new_crop" in second else []),
          f"## Power, global vs region ({args.power_trials} trials)", "", *table(power, "n"), "",
          f"## Gradual drift, n=200 ({args.power_trials} trials)", "",
          *table({f"{100 * k:.0f}%": v for k, v in gradual.items()}, "region share"), "",
          "## OOD AUROC (global test vs region, unless the row says otherwise)", "", "| bank | k | AUROC | flagged global test | flagged region |",
          "|---|---:|---:|---:|---:|",
          *[f"| {k} ({v['bank']}) | {v['k']} | {v['auroc']:.3f} | {v['flagged_in']:.3f} | {v['flagged_out']:.3f} |"
            for k, v in ood.items()], "", "## Accuracy estimate", "",
          f"Temperature {accuracy['temperature']:.3f} (fitted on global val).", "",
          "| data | true | estimated | abs error (points) | uncalibrated | its error |", "|---|---:|---:|---:|---:|---:|",
          *[f"| {k} | {v['true']:.3f} | {v['estimated']:.3f} | {v['abs_error_points']:.1f} | {v['uncalibrated']:.3f} | "
            f"{v['uncalibrated_abs_error_points']:.1f} |" for k, v in accuracy.items() if k != "temperature"], "",
          "## Throughput (samples/s, 1 thread)", "", *[f"- {k}: {v:.4g}" for k, v in speed.items()], ""]
    (out / "bench_monitor.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
