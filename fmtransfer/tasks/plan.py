"""``plan``: read an adapt sweep and answer "how many local labels does this region need?"."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from fmtransfer.errors import DataError
from fmtransfer.lineage import RunRecord, write_json_atomic, write_text_atomic
from fmtransfer.plots import learning_curve_png
from fmtransfer.tasks.common import run_dir
from fmtransfer.tasks.result import StageResult

REFERENCE_METHODS = ("scratch",)  # drawn as reference lines, not counted as adaptation methods


def collect(folders: list[Path]) -> list[dict[str, Any]]:
    """Every adapt run's metrics.json under ``folders`` (recursively)."""
    runs = []
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"sweep={folder}: no such folder")
        for path in sorted(folder.rglob("metrics.json")):
            m = json.loads(path.read_text())
            if m.get("stage") == "adapt":
                runs.append({**m, "run_dir": str(path.parent)})
    if not runs:
        raise DataError(f"no adapt runs (metrics.json with stage 'adapt') under {', '.join(map(str, folders))}")
    return runs


def summarise(runs: list[dict[str, Any]], metric: str = "accuracy") -> dict[str, Any]:
    """Mean and spread per (method, calibration size) over seeds, and the zero-shot reference.

    Returns ``{"curves": {method: {size: {"mean", "std", "n_runs", "values"}}}, "zero_shot": float | None}``.
    """
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    zero = []
    for r in runs:
        values[r["method"]][int(r["calibration"]["size"])].append(float(r["test"]["overall"][metric]))
        if r.get("zero_shot"):
            zero.append(float(r["zero_shot"]["overall"][metric]))
    curves = {m: {s: {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0,
                      "n_runs": len(v), "values": v} for s, v in sorted(sizes.items())}
              for m, sizes in sorted(values.items())}
    return {"curves": curves, "zero_shot": statistics.fmean(zero) if zero else None}


def labels_needed(curves: dict[str, Any], targets: list[float]) -> tuple[float, dict[str, dict[float, int | None]]]:
    """For each method and target fraction x: the smallest measured calibration size whose mean reaches
    x * (best mean of any adaptation method at any size). None: not reached at the sizes measured."""
    adapting = {m: c for m, c in curves.items() if m not in REFERENCE_METHODS} or curves
    best = max(p["mean"] for c in adapting.values() for p in c.values())
    table = {m: {t: next((s for s, p in sorted(c.items()) if p["mean"] >= t * best), None) for t in targets}
             for m, c in curves.items()}
    return best, table


def plan_markdown(summary: dict[str, Any], best: float, needed: dict, targets: list[float], metric: str) -> str:
    sizes = sorted({s for c in summary["curves"].values() for s in c})
    lines = [f"### {metric} on the region's test split (mean ± spread over seeds)", "",
             "| method | " + " | ".join(f"n={s}" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for m, c in summary["curves"].items():
        cells = [("" if s not in c else f"{c[s]['mean']:.4f}" if c[s]["n_runs"] == 1
                  else f"{c[s]['mean']:.4f} ± {c[s]['std']:.4f} ({c[s]['n_runs']} seeds)") for s in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if summary["zero_shot"] is not None:
        lines += ["", f"Zero-shot (no local labels): {summary['zero_shot']:.4f}."]
    lines += ["", f"### Local labels needed to reach a share of the best {metric} ({best:.4f})", "",
              "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |", "|---|" + "---:|" * len(targets)]
    for m, row in needed.items():
        lines.append(f"| {m} | " + " | ".join(str(row[t]) if row[t] is not None else "not reached" for t in targets) + " |")
    lines += ["", "Sizes are the smallest calibration size measured in the sweep that reaches the target; "
              "nothing is extrapolated."]
    return "\n".join(lines)


def plan(cfg: DictConfig) -> StageResult:
    """Writes ``plan.md``, ``plan.json`` and ``learning_curve.png`` into the run dir; the result's metrics are
    plan.json's content and its section the plan's tables."""
    out = run_dir(cfg)
    sweep = cfg.sweep
    folders = [Path(p) for p in (sweep if isinstance(sweep, (list, ListConfig)) else [sweep])]
    targets = [float(t) for t in cfg.targets]
    with RunRecord("plan", out, cfg) as record:
        runs = collect(folders)
        for r in runs:
            if (Path(r["run_dir"]) / "run.json").is_file():
                record.add_parent(r["run_dir"])
        summary = summarise(runs, cfg.metric)
        best, needed = labels_needed(summary["curves"], targets)
        recipe = runs[0]["recipe"]
        png = learning_curve_png(summary, out / "learning_curve.png", f"{recipe}: {cfg.metric} vs local labels",
                                 cfg.metric, reference_methods=REFERENCE_METHODS)
        text = plan_markdown(summary, best, needed, targets, cfg.metric)
        write_text_atomic(out / "plan.md", f"# Calibration-size plan: {recipe}\n\n{text}\n\n![learning curve](learning_curve.png)\n")
        result = {"recipe": recipe, "runs": len(runs), "best": best, "targets": targets,
                  "labels_needed": {m: {str(t): n for t, n in row.items()} for m, row in needed.items()},
                  **summary}
        write_json_atomic(out / "plan.json", result)
        outputs = {"report": out / "plan.md", "plan_json": out / "plan.json", "learning_curve": png}
        for role, path in outputs.items():
            record.add_output(path, "plan" if role == "report" else role)
    return StageResult("plan", out, result, outputs, [("Calibration-size plan", text)])
