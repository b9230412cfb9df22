"""Regional adaptation on real data: mnist_global -> uci_digits_region, every method, several label budgets.

    python scripts/bench_adapt.py                          # the full grid (about an hour on 2 CPU cores)
    python scripts/bench_adapt.py --sizes 100 --seeds 0    # one column

For each calibration size n and seed: zero-shot, from scratch on the n samples, linear probe, full fine-tuning,
LoRA and BitFit over a ResNet-18 base, and VPT over a ViT-Tiny base, each an ``adapt`` stage run with its
default config. Reports accuracy on the region's test split (mean and spread over seeds), trainable parameter
share, adapter file size, and adaptation wall time; writes JSON, a markdown table and the learning-curve plot
under --out. Finished runs are kept and skipped on a re-run, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmtransfer.config import compose_stage  # noqa: E402
from fmtransfer.plots import learning_curve_png  # noqa: E402
from fmtransfer.tasks.adapt import adapt  # noqa: E402
from fmtransfer.tasks.plan import summarise  # noqa: E402
from fmtransfer.tasks.pretrain import pretrain  # noqa: E402

BASES = {"resnet18": ["experiment=demo"], "vit_tiny": ["experiment=vit_from_scratch"]}
METHODS = {"scratch": "resnet18", "linear_probe": "resnet18", "bitfit": "resnet18", "full": "resnet18",
           "lora": "resnet18", "vpt": "vit_tiny"}


def get_base(name: str, folder: Path) -> Path:
    """Pretrain the base once (the demo's settings) and keep it."""
    run = folder / "bases" / name
    if not (run / "model.json").is_file():
        pretrain(compose_stage("pretrain", [*BASES[name], "logger=none", f"run_dir={run}"]))
    return run


def run_one(base: Path, method: str, size: int, seed: int, folder: Path) -> dict:
    run = folder / "runs" / f"{method}_n{size}_s{seed}"
    if not (run / "metrics.json").is_file():
        cfg = compose_stage("adapt", [f"base={base}", f"adapter={method}", f"calibration.size={size}",
                                      f"seed={seed}", "logger=none", "checkpoints=1", f"run_dir={run}"])
        adapt(cfg)
    return json.loads((run / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 300, 1000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "adapt")
    args = p.parse_args()

    bases = {name: get_base(name, args.out) for name in sorted({METHODS[m] for m in args.methods})}
    runs = []
    for size in args.sizes:
        for seed in args.seeds:
            for method in args.methods:
                m = run_one(bases[METHODS[method]], method, size, seed, args.out)
                runs.append(m)
                print(f"[n={size} seed={seed}] {method:12s} acc {m['test']['overall']['accuracy']:.4f} "
                      f"trainable {m['trainable_fraction']:.2%} {m['fit_seconds']:.0f}s", flush=True)

    rows = []
    for method in args.methods:
        for size in args.sizes:
            sel = [r for r in runs if r["method"] == method and r["calibration"]["size"] == size]
            acc = [r["test"]["overall"]["accuracy"] for r in sel]
            rows.append({"method": method, "base": METHODS[method], "n": size, "acc_mean": statistics.fmean(acc),
                         "acc_std": statistics.pstdev(acc), "seeds": len(acc),
                         "trainable_fraction": sel[0]["trainable_fraction"],
                         "adapter_mb": sel[0]["adapter_bytes"] / 1e6, "adapter_to_base": sel[0]["adapter_to_base"],
                         "seconds_median": statistics.median(r["fit_seconds"] for r in sel)})
    zero = {b: statistics.fmean(r["zero_shot"]["overall"]["accuracy"] for r in runs
                                if METHODS[r["method"]] == b and r.get("zero_shot")) for b in bases}

    lines = ["| method | base | n | accuracy (mean ± std over seeds) | trainable | adapter file | vs base file | "
             "wall time (median) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for b, z in zero.items():
        lines.append(f"| zero-shot | {b} | 0 | {z:.4f} | 0 | - | - | - |")
    for r in rows:
        lines.append(f"| {r['method']} | {r['base']} | {r['n']} | {r['acc_mean']:.4f} ± {r['acc_std']:.4f} | "
                     f"{r['trainable_fraction']:.2%} | {r['adapter_mb']:.2f} MB | {r['adapter_to_base']:.1%} | "
                     f"{r['seconds_median']:.0f} s |")
    table = "\n".join(lines)

    def row(method, n):
        return next((r for r in rows if r["method"] == method and r["n"] == n), None)

    checks = []
    if row("lora", 100):
        r = row("lora", 100)
        checks.append(f"LoRA at n=100: {r['acc_mean']:.4f} (target >= 0.95) with {r['trainable_fraction']:.2%} "
                      f"trainable (target <= 2%)")
    for n in args.sizes:
        if row("lora", n) and row("full", n):
            gap = row("lora", n)["acc_mean"] - row("full", n)["acc_mean"]
            checks.append(f"LoRA - full at n={n}: {gap:+.4f} (target >= -0.01)")
    if row("lora", args.sizes[0]):
        checks.append(f"LoRA adapter file: {row('lora', args.sizes[0])['adapter_to_base']:.2%} of the base (target <= 5%)")

    resnet_runs = [r for r in runs if METHODS[r["method"]] == "resnet18"]
    summary = summarise(resnet_runs)
    summary["zero_shot"] = zero.get("resnet18")
    vit = summarise([r for r in runs if r["method"] == "vpt"]) if "vpt" in args.methods else None
    if vit:
        summary["curves"]["vpt (ViT-Tiny base)"] = vit["curves"]["vpt"]
    args.out.mkdir(parents=True, exist_ok=True)
    png = learning_curve_png(summary, args.out / "learning_curve.png",
                             "uci_digits_region: accuracy vs local labels (mean ± std, 3 seeds)")
    (args.out / "bench_adapt.md").write_text(table + "\n\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    (args.out / "bench_adapt.json").write_text(json.dumps({"rows": rows, "zero_shot": zero, "checks": checks,
                                                           "settings": {k: str(v) for k, v in vars(args).items()}},
                                                          indent=2) + "\n")
    print("\n" + table + "\n")
    print("\n".join(checks))
    print(f"\nwrote {args.out / 'bench_adapt.json'}, {args.out / 'bench_adapt.md'}, {png}")


if __name__ == "__main__":
    main()
