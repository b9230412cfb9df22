"""Edge export on real data: size, latency and accuracy of PyTorch fp32, ONNX fp32 and ONNX INT8.

    python scripts/bench_export.py                     # the demo's region model (ResNet-18 + LoRA) and a ViT
    python scripts/bench_export.py --latency-only      # INT8 vs fp32 latency only, in a few minutes
    python scripts/bench_export.py --latency-only --models "resnet18 + lora" --rounds 10 --repeats 60

Models: the ResNet-18 region model (mnist_global base + a LoRA adapter from 100 uci_digits_region labels) and
a ViT-Tiny region model (its base + a VPT adapter from 100 labels), taken from scripts/bench_adapt.py's
outputs when they exist, trained here otherwise. Each goes through the `export` stage once per INT8 mode
(static QDQ and dynamic). Accuracy is on the region's test split (539 images), for --seeds calibration samples
(one image is 0.19 points, so a single sample's drop is noisy). Static INT8 is also run with every layer
quantized (export.keep_fp32.static=[]) and without bias correction (export.calibration.bias_correction=false),
to show what keeping the stem and the classifier in fp32, and correcting the biases, each buy (--ablations).

Latency (fmtransfer.export.latency): each model's ONNX fp32 and INT8 files on sessions set up alike, taking
turns in --rounds rounds of --repeats / --rounds timed calls (after --warmup untimed ones) at batch 1 and 32,
on real test images; medians over all calls, and the INT8/fp32 throughput ratio as the median over rounds of
each round's fp32 / INT8 median time (so a load change between rounds cancels out). --cpu adds the same with
one thread timed in CPU time (the work per batch, which another process's load does not change). The stage's
own table (PyTorch eager included) is in each run's export.md.

--latency-only skips accuracy, seeds and ablations: it reuses the seed-0 export of each (model, mode) under
--out when there is one (--reexport: never), else exports once without bias correction on 32 calibration images
(neither changes the graph, only values, so latency is the same), and times only the ONNX files; --modes
defaults to the family's own (auto) there.
Writes bench_export.json and bench_export.md under --out (bench_export_latency.* with --latency-only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmtransfer.config import compose_stage  # noqa: E402
from fmtransfer.data import build_datamodule, load_recipe  # noqa: E402
from fmtransfer.export import latency  # noqa: E402
from fmtransfer.export.onnx_export import INPUT_NAME  # noqa: E402
from fmtransfer.tasks.adapt import adapt  # noqa: E402
from fmtransfer.tasks.export import export  # noqa: E402
from fmtransfer.tasks.pretrain import pretrain  # noqa: E402

ADAPT_OUT = ROOT / "outputs" / "bench" / "adapt"
MODELS = {"resnet18 + lora": ("resnet18", "experiment=demo", "lora"),
          "vit_tiny + vpt": ("vit_tiny", "experiment=vit_from_scratch", "vpt")}


# static INT8 ablations: what keeping the stem and classifier in fp32, and bias correction, each buy
ABLATIONS = {"all_int8": ("static, keep_fp32=[]", ["export.keep_fp32.static=[]"]),
             "no_bias_correction": ("static, no bias correction", ["export.calibration.bias_correction=false"])}


def region_adapter(base_name: str, recipe: str, method: str) -> Path:
    """bench_adapt's n=100 seed-0 adapter (trained here when missing)."""
    base = ADAPT_OUT / "bases" / base_name
    if not (base / "model.json").is_file():
        pretrain(compose_stage("pretrain", [recipe, "logger=none", f"run_dir={base}"]))
    run = ADAPT_OUT / "runs" / f"{method}_n100_s0"
    if not (run / "adapter.safetensors").is_file():
        adapt(compose_stage("adapt", [f"base={base}", f"adapter={method}", "calibration.size=100", "seed=0",
                                      "logger=none", "checkpoints=1", f"run_dir={run}"]))
    return run / "adapter.safetensors"


def export_run(adapter: Path, mode: str, extra: list[str], seed: int, run: Path, repeats: int) -> dict:
    """One `export` stage run; its metrics.json, also when a gate rejected it."""
    cfg = compose_stage("export", [f"adapter_file={adapter}", "data=uci_digits_region", f"seed={seed}",
                                   f"export.quantize={mode}", *extra, f"export.latency.repeats={repeats}",
                                   f"run_dir={run}"])
    try:
        return export(cfg).metrics
    except Exception as e:  # noqa: BLE001 - a rejected export is a result too
        print(f"{run.name}: {e}")
        return json.loads((run / "metrics.json").read_text())


def onnx_pair(run: Path) -> tuple[Path, Path] | None:
    """The fp32 and INT8 files of an export run, released or rejected (None when it has no INT8 file)."""
    for folder in (run, run / "rejected"):
        if (folder / "model.int8.onnx").is_file():
            return folder / "model.onnx", folder / "model.int8.onnx"
    return None


def latency_inputs(out: Path, n: int = 64) -> np.ndarray:
    """The first ``n`` preprocessed images of uci_digits_region's test split (the latency inputs)."""
    cfg = compose_stage("export", ["data=uci_digits_region"])
    dm = build_datamodule(load_recipe(cfg.data), cfg.loader, output_dir=out / "data")
    parts, count = [], 0
    for x, _, _ in dm.dataloader("test"):
        parts.append(x.numpy())
        count += len(x)
        if count >= n:
            break
    return np.concatenate(parts)[:n]


def time_pair(fp32: Path, int8: Path, x: np.ndarray, args: argparse.Namespace, threads: int,
              clock=time.perf_counter) -> dict:
    """fp32 and INT8 timed in interleaved rounds at each batch size: medians and the per-round INT8/fp32
    throughput ratio."""
    sessions = {name: latency.timing_session(path, threads) for name, path in (("fp32", fp32), ("int8", int8))}
    runners = {name: (lambda b, s=s: s.run(None, {INPUT_NAME: b})) for name, s in sessions.items()}
    out = {}
    for bs in args.batch_sizes:
        times = latency.time_rounds(runners, latency.batch_of(x, bs), repeats=args.repeats, warmup=args.warmup,
                                    rounds=args.rounds, clock=clock)
        ratios = latency.round_ratios(times, "fp32", "int8")
        out[f"batch_{bs}"] = {"fp32_ms": latency.median_ms(times["fp32"]), "int8_ms": latency.median_ms(times["int8"]),
                              "int8_over_fp32_throughput": statistics.median(ratios),
                              "per_round": [round(r, 3) for r in ratios]}
    return out


def latency_rows(pairs: list[tuple[str, str, Path, Path]], args: argparse.Namespace) -> list[dict]:
    """The latency pass over every (model, mode)'s files; the load average is recorded around each."""
    x = latency_inputs(args.out)
    rows = []
    for label, mode, fp32, int8 in pairs:
        row = {"model": label, "mode": mode, "fp32_file": str(fp32), "int8_file": str(int8),
               "threads": args.threads or latency.cpu_threads(), "load_before": os.getloadavg()[0]}
        row["wall"] = time_pair(fp32, int8, x, args, row["threads"])
        if args.cpu:  # one thread, so the calling thread does all the work and its CPU time is that work
            row["cpu_1_thread"] = time_pair(fp32, int8, x, args, 1, clock=time.thread_time)
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
    return rows


def latency_table(rows: list[dict], args: argparse.Namespace) -> str:
    big = max(args.batch_sizes)
    lines = ["| model | INT8 mode | timing | threads | "
             + " | ".join(f"fp32 b{bs} (ms) | INT8 b{bs} (ms)" for bs in args.batch_sizes)
             + f" | INT8/fp32 throughput, b{big}: median over rounds (min-max) | load avg before/after |",
             "|---|---|---|---:|" + "---:|---:|" * len(args.batch_sizes) + "---:|---:|"]
    for r in rows:
        for kind, threads in (("wall", r["threads"]), ("cpu_1_thread", 1)):
            if kind not in r:
                continue
            t = r[kind]
            cells = " | ".join(f"{t[f'batch_{bs}']['fp32_ms']:.2f} | {t[f'batch_{bs}']['int8_ms']:.2f}"
                               for bs in args.batch_sizes)
            b = t[f"batch_{big}"]
            lines.append(f"| {r['model']} | {r['mode']} | {'wall' if kind == 'wall' else 'CPU time'} | {threads} | "
                         f"{cells} | **{b['int8_over_fp32_throughput']:.2f}x** ({min(b['per_round']):.2f}-"
                         f"{max(b['per_round']):.2f}) | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", f"{args.rounds} rounds of {args.repeats // args.rounds} timed calls (+ {args.warmup} warm-up) "
              f"per file and batch size, fp32 and INT8 taking turns; {os.cpu_count()} CPUs here."]
    return "\n".join(lines)


def quick_exports(labels: list[str], adapter_files: dict[str, str], args: argparse.Namespace) -> list:
    """(label, mode, fp32, INT8) per model and mode: the seed-0 full export when there is one, else a quick one."""
    pairs = []
    for label in labels:
        adapter = Path(adapter_files[label]) if label in adapter_files else region_adapter(*MODELS[label])
        short = label.replace(" ", "_").replace("+", "") if label in adapter_files else MODELS[label][2]
        for mode in args.modes:
            found = None if args.reexport else onnx_pair(args.out / "runs" / f"{short}_{mode}_s0")
            if found is None:
                run = args.out / "runs" / f"{short}_{mode}_latency"
                found = None if args.reexport else onnx_pair(run)
                if found is None:
                    export_run(adapter, mode, ["export.calibration.bias_correction=false", "export.calibration.size=32"],
                               0, run, 1)
                    found = onnx_pair(run)
            if found is None:
                print(f"{label} / {mode}: no INT8 file (export.quantize=none?)")
                continue
            print(f"{label} / {mode}: timing {found[0]} and {found[1].name}")
            pairs.append((label, mode, *found))
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency-only", action="store_true",
                   help="time ONNX fp32 vs INT8 only (no accuracy, seeds or ablations)")
    p.add_argument("--reexport", action="store_true",
                   help="with --latency-only: export again even where --out already has the files")
    p.add_argument("--repeats", type=int, default=60, help="timed calls per file and batch size")
    p.add_argument("--rounds", type=int, default=10, help="fp32 and INT8 take turns this many times")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each block of timed calls")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: every CPU, as export)")
    p.add_argument("--cpu", action="store_true", help="also time with one thread in CPU time (load-proof work)")
    p.add_argument("--modes", nargs="+", default=None,
                   help="INT8 modes (default: static dynamic; auto with --latency-only)")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--seeds", type=int, default=3, help="calibration samples per variant (accuracy per seed)")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS),
                   help="static INT8 variants beside the default export (none: --ablations)")
    p.add_argument("--adapter-file", action="append", default=[], metavar="LABEL=PATH",
                   help="also export this adapter (e.g. the one `make demo` wrote: "
                        "'demo lora=outputs/<run>/adapt/1_lora_n100/adapter.safetensors'); repeatable")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "export")
    args = p.parse_args()
    args.modes = args.modes or (["auto"] if args.latency_only else ["static", "dynamic"])
    adapter_files = dict(item.split("=", 1) for item in args.adapter_file)
    labels = [*args.models, *adapter_files]
    args.out.mkdir(parents=True, exist_ok=True)

    if args.latency_only:
        rows = latency_rows(quick_exports(labels, adapter_files, args), args)
        table = latency_table(rows, args)
        (args.out / "bench_export_latency.md").write_text(table + "\n")
        (args.out / "bench_export_latency.json").write_text(json.dumps({"latency": rows, "args": {
            k: v for k, v in vars(args).items() if k != "out"}}, indent=2, default=str) + "\n")
        print("\n" + table)
        print(f"\nwrote {args.out / 'bench_export_latency.json'}, {args.out / 'bench_export_latency.md'}")
        return

    results, pairs = [], []
    for label in labels:
        adapter = Path(adapter_files[label]) if label in adapter_files else region_adapter(*MODELS[label])
        short = label.replace(" ", "_").replace("+", "") if label in adapter_files else MODELS[label][2]
        variants = [(mode, [], mode) for mode in args.modes]
        if "static" in args.modes:
            variants += [(*ABLATIONS[a], f"static_{a}") for a in args.ablations]
        for mode, extra, name in variants:
            seeds = []
            for seed in range(args.seeds):  # the calibration sample's seed; latency is timed on seed 0 only
                run = args.out / "runs" / f"{short}_{name}_s{seed}"
                seeds.append(export_run(adapter, mode.split(",")[0], extra, seed, run, args.repeats if seed == 0 else 3))
                if seed == 0 and name == mode and onnx_pair(run):
                    pairs.append((label, mode, *onnx_pair(run)))
            m = seeds[0]
            v = {r["variant"].split(" (")[0]: r for r in m["variants"]}
            torch_, fp32, int8 = v["PyTorch eager fp32"], v["ONNX fp32"], v["ONNX INT8"]
            drops = [torch_["accuracy"] - next(r for r in s_["variants"] if r["variant"].startswith("ONNX INT8"))
                     ["accuracy"] for s_ in seeds]
            results.append({"model": label, "mode": mode, "passed": m["passed"], "variants": m["variants"],
                            "int8_to_fp32_size": m["int8_to_fp32_size"],
                            "int8_b1_vs_torch": int8["batch_1_ms"] / torch_["batch_1_ms"],
                            "int8_b32_vs_torch": int8["batch_32_ms"] / torch_["batch_32_ms"],
                            "fp32_b1_vs_torch": fp32["batch_1_ms"] / torch_["batch_1_ms"],
                            "accuracy_drop": drops[0], "accuracy_drop_per_seed": drops,
                            "accuracy_drop_median": statistics.median(drops), "accuracy_drop_max": max(drops),
                            "agreement": m["int8_fp32_agreement"],
                            "agreement_per_seed": [s_["int8_fp32_agreement"] for s_ in seeds],
                            "rmse_per_seed": [s_.get("int8_fp32_rmse") for s_ in seeds],
                            "passed_per_seed": [s_["passed"] for s_ in seeds],
                            "fp32_nodes": m.get("fp32_nodes", []), "calibration_method": m.get("calibration_method"),
                            "bias_correction": m.get("bias_correction"), "gates": m["gates"]})
    rows = latency_rows(pairs, args)

    lines = ["| model | INT8 mode | variant | size (MB) | batch 1 (ms) | batch 32 (ms) | accuracy |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        for v in r["variants"]:
            size = f"{v['mb']:.2f}" if v["mb"] else "-"
            lines.append(f"| {r['model']} | {r['mode']} | {v['variant'].split(' (')[0]} | {size} | "
                         f"{v['batch_1_ms']:.2f} | {v['batch_32_ms']:.2f} | {v['accuracy']:.4f} |")
    lines += ["", "| model | INT8 mode | INT8/fp32 size (target <= 0.3) | INT8 b1 / PyTorch b1 (target <= 0.5) | "
              "INT8 b32 / PyTorch b32 | accuracy drop, seed 0 (target <= 0.005) | drop, median / max over seeds | "
              "top-1 agreement (min over seeds) | INT8 - fp32 output RMS, per seed | gates passed |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        how = (f" ({r['calibration_method']}{', bias-corrected' if r['bias_correction'] else ''})"
               if r.get("calibration_method") else "")
        lines.append(f"| {r['model']} | {r['mode']}{how} | {r['int8_to_fp32_size']:.3f} | {r['int8_b1_vs_torch']:.3f} | "
                     f"{r['int8_b32_vs_torch']:.3f} | {r['accuracy_drop']:+.4f} | "
                     f"{r['accuracy_drop_median']:+.4f} / {r['accuracy_drop_max']:+.4f} | "
                     f"{min(r['agreement_per_seed']):.4f} | "
                     f"{' / '.join(f'{v:.3f}' for v in r['rmse_per_seed'] if v is not None)} | {sum(r['passed_per_seed'])}/{len(r['passed_per_seed'])} |")
    lines += ["", "ONNX fp32 vs INT8, timed alike in interleaved rounds (the stage's own table above is one "
              "process's single pass):", "", latency_table(rows, args)]
    table = "\n".join(lines)
    (args.out / "bench_export.md").write_text(table + "\n")
    (args.out / "bench_export.json").write_text(json.dumps({"results": results, "latency": rows,
                                                            "repeats": args.repeats, "rounds": args.rounds},
                                                           indent=2, default=str) + "\n")
    print("\n" + table)
    print(f"\nwrote {args.out / 'bench_export.json'}, {args.out / 'bench_export.md'}")


if __name__ == "__main__":
    main()
