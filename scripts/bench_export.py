"""Edge export on real data: size, latency and accuracy of PyTorch fp32, ONNX fp32 and ONNX INT8.

    python scripts/bench_export.py                     # the demo's region model (ResNet-18 + LoRA) and a ViT
    python scripts/bench_export.py --repeats 100

Models: the ResNet-18 region model (mnist_global base + a LoRA adapter from 100 uci_digits_region labels) and
a ViT-Tiny region model (its base + a VPT adapter from 100 labels), taken from scripts/bench_adapt.py's
outputs when they exist, trained here otherwise. Each goes through the `export` stage once per INT8 mode
(static QDQ and dynamic); latency is the median of --repeats timed calls per variant and batch size, measured
in the same process, so the ratios compare like with like. Accuracy is on the region's test split (539 images),
for --seeds calibration samples (one image is 0.19 points, so a single sample's drop is noisy). Static INT8 is
also run with every layer quantized (export.keep_fp32.static=[]) and without bias correction
(export.calibration.bias_correction=false), to show what keeping the stem and the classifier in fp32, and
correcting the biases, each buy (--ablations).
Writes bench_export.json and bench_export.md under --out.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--modes", nargs="+", default=["static", "dynamic"])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--seeds", type=int, default=3, help="calibration samples per variant (accuracy per seed)")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS),
                   help="static INT8 variants beside the default export (none: --ablations)")
    p.add_argument("--adapter-file", action="append", default=[], metavar="LABEL=PATH",
                   help="also export this adapter (e.g. the one `make demo` wrote: "
                        "'demo lora=outputs/<run>/adapt/1_lora_n100/adapter.safetensors'); repeatable")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "export")
    args = p.parse_args()

    results = []
    adapter_files = dict(item.split("=", 1) for item in args.adapter_file)
    for label in [*args.models, *adapter_files]:
        adapter = Path(adapter_files[label]) if label in adapter_files else region_adapter(*MODELS[label])
        short = label.replace(" ", "_").replace("+", "") if label in adapter_files else MODELS[label][2]
        variants = [(mode, [], mode) for mode in args.modes]
        if "static" in args.modes:
            variants += [(*ABLATIONS[a], f"static_{a}") for a in args.ablations]
        for mode, extra, name in variants:
            seeds = []
            for seed in range(args.seeds):  # the calibration sample's seed; latency is timed on seed 0 only
                tag = f"{short}_{name}_s{seed}"
                cfg = compose_stage("export", [f"adapter_file={adapter}", "data=uci_digits_region", f"seed={seed}",
                                               f"export.quantize={mode.split(',')[0]}", *extra,
                                               f"export.latency.repeats={args.repeats if seed == 0 else 3}",
                                               f"run_dir={args.out / 'runs' / tag}"])
                try:
                    m = export(cfg).metrics
                except Exception as e:  # noqa: BLE001 - a rejected export is a result too
                    print(f"{label} / {mode} / seed {seed}: {e}")
                    m = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
                seeds.append(m)
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
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_export.md").write_text(table + "\n")
    (args.out / "bench_export.json").write_text(json.dumps({"results": results, "repeats": args.repeats}, indent=2)
                                                + "\n")
    print("\n" + table)
    print(f"\nwrote {args.out / 'bench_export.json'}, {args.out / 'bench_export.md'}")


if __name__ == "__main__":
    main()
