"""Registry benchmarks: registration throughput with concurrent writers, and `verify` time per GB.

    python scripts/bench_registry.py                    # both parts, defaults below
    python scripts/bench_registry.py --writers 2 --per-writer 500 --repeats 5 --verify-mb 400

throughput: --writers processes (2 by default) start together on a fresh registry file and each registers
    --per-writer artifacts, one transaction each as a stage's end does (a row with region and headline metrics, its
    file's location and 2 parent edges); artifacts per second = all rows / the wall time from the start signal until
    the last writer is done. The same with 1 writer for comparison. Median (and min, max) over --repeats fresh files.
verify: --verify-mb MB of random bytes in --verify-files files in a temp dir, registered, then `Registry.verify`
    (re-hash every file, 2 threads as `fmtransfer registry verify` uses by default, and 1) timed --repeats times:
    seconds per GB (1e9 bytes) as the median. The files were just written, so they are read from the page cache: the
    figure is the hashing cost; a cold read adds the disk's own time per GB.
hook (--run-dir DIR, a finished run): what registering that run costs at its end (RunRecord's hook, one
    transaction for its outputs, inputs and data), into a fresh registry and again (idempotent), median of 20.
Writes bench_registry.json (and prints a table) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WRITER = """
import hashlib, json, sys, time
from pathlib import Path
from fmtransfer.lineage.registry import Registry
path, name, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
reg = Registry(path)
sha = lambda text: hashlib.sha256(text.encode()).hexdigest()
roots = [sha("data"), sha("base")]
reg.register(roots[0], "data", name="data")
reg.register(roots[1], "base", name="base", parents=[roots[0]])
metrics = {"passed": True, "gates": [{"name": "max_abs_diff", "value": 1e-6, "threshold": 1e-3, "passed": True}],
           "test": {"accuracy": 0.97, "macro_f1": 0.96, "n": 500}}
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
for i in range(n):
    reg.register(sha(f"{name}-{i}"), "adapter", path=f"/runs/{name}/{i}/adapter.safetensors", region=name,
                 name="adapter.safetensors", size=1234, metrics=metrics, stage="adapt", role="adapter",
                 run_id=f"{name}{i}", run_dir=f"/runs/{name}/{i}", parents=[(roots[0], "data"), (roots[1], "base")])
print("done", time.perf_counter(), flush=True)
"""


def _throughput_once(writers: int, per_writer: int, folder: Path) -> float:
    db, go = folder / "registry.sqlite", folder / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(db), f"w{k}", str(per_writer), str(go)], env=env,
                              stdout=subprocess.PIPE, text=True) for k in range(writers)]
    for p in procs:  # every writer has opened the registry and waits
        assert p.stdout.readline().strip() == "ready"
    start = time.perf_counter()
    go.touch()
    for p in procs:
        p.wait(timeout=600)
        assert p.returncode == 0
    seconds = time.perf_counter() - start
    from fmtransfer.lineage.registry import Registry

    with Registry(db) as reg:
        rows = reg.counts()["artifacts"] - 2
    assert rows == writers * per_writer, f"lost rows: {rows} of {writers * per_writer}"
    return rows / seconds


def throughput(writers: int, per_writer: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(_throughput_once(writers, per_writer, Path(tmp)))
    return {"writers": writers, "per_writer": per_writer, "repeats": repeats,
            "per_s_median": statistics.median(runs), "per_s_min": min(runs), "per_s_max": max(runs),
            "runs": [round(r, 1) for r in runs]}


def verify_speed(total_mb: int, files: int, repeats: int) -> dict:
    from fmtransfer.lineage.registry import Registry

    out = {"bytes": 0, "files": files}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = total_mb * 1_000_000 // files
        with Registry(folder / "registry.sqlite") as reg:
            for k in range(files):
                path = folder / f"artifact_{k}.bin"
                with open(path, "wb") as f:
                    for _ in range(size // 1_000_000):
                        f.write(os.urandom(1_000_000))
                    f.write(os.urandom(size % 1_000_000))
                reg.register_file(path, "onnx", region="bench")
                out["bytes"] += size
            for threads in (2, 1):
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    checks = reg.verify(threads=threads)
                    times.append(time.perf_counter() - start)
                    assert all(c.status == "ok" for c in checks) and len(checks) == files
                gb = out["bytes"] / 1e9
                out[f"threads_{threads}"] = {"seconds_median": statistics.median(times),
                                             "seconds_per_gb": statistics.median(times) / gb,
                                             "gb_per_s": gb / statistics.median(times),
                                             "runs": [round(t, 3) for t in times]}
    return out


def hook_cost(run_dir: Path, repeats: int = 20) -> dict:
    from fmtransfer.lineage.record import load_record
    from fmtransfer.lineage.registry import register_finished_run

    record = load_record(run_dir)
    first, again = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "registry.sqlite"
            for times in (first, again):
                start = time.perf_counter()
                made = register_finished_run(record, db)
                times.append(time.perf_counter() - start)
    return {"run_dir": str(run_dir), "stage": record["stage"], "outputs_registered": len(made),
            "ms_first_median": 1000 * statistics.median(first), "ms_again_median": 1000 * statistics.median(again)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writers", type=int, default=2)
    p.add_argument("--per-writer", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--verify-mb", type=int, default=400)
    p.add_argument("--verify-files", type=int, default=8)
    p.add_argument("--parts", nargs="+", default=["throughput", "verify"], choices=["throughput", "verify"])
    p.add_argument("--run-dir", type=Path, default=None, help="a finished run: time its registration (the hook)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_registry")
    args = p.parse_args()
    result: dict = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
    if "throughput" in args.parts:
        result["throughput"] = [throughput(w, args.per_writer, args.repeats) for w in sorted({1, args.writers})]
    if "verify" in args.parts:
        result["verify"] = verify_speed(args.verify_mb, args.verify_files, max(3, args.repeats // 2))
    if args.run_dir is not None:
        result["hook"] = hook_cost(args.run_dir)
    result["load_average_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_registry.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| measurement | median | range |\n|---|---|---|")
    for t in result.get("throughput", []):
        print(f"| registered per second, {t['writers']} writer(s) x {t['per_writer']} (one transaction each) | "
              f"{t['per_s_median']:.0f}/s | {t['per_s_min']:.0f}-{t['per_s_max']:.0f}/s |")
    if "verify" in result:
        v = result["verify"]
        for threads in (2, 1):
            r = v[f"threads_{threads}"]
            print(f"| verify, {v['bytes'] / 1e6:.0f} MB in {v['files']} files, {threads} thread(s) | "
                  f"{r['seconds_per_gb']:.2f} s/GB ({r['gb_per_s']:.2f} GB/s) | runs {r['runs']} s |")
    if "hook" in result:
        h = result["hook"]
        print(f"| registering a finished {h['stage']} run ({h['outputs_registered']} outputs) at its end | "
              f"{h['ms_first_median']:.1f} ms | again (nothing new): {h['ms_again_median']:.1f} ms |")
    print(f"load average {result['load_average_before']:.1f} -> {result['load_average_after']:.1f} on "
          f"{result['cpus']} CPUs; {args.out / 'bench_registry.json'}")


if __name__ == "__main__":
    main()
