"""``plan``: read an adapt sweep and answer "how many local labels does this region need?"."""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from fmtransfer.config import require
from fmtransfer.errors import DataError
from fmtransfer.lineage import RunRecord, write_json_atomic, write_text_atomic
from fmtransfer.lineage.record import RUN_FILE
from fmtransfer.plots import learning_curve_png
from fmtransfer.tasks.common import run_dir
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)
REFERENCE_METHODS = ("scratch",)  # drawn as reference lines, not counted as adaptation methods


def _read(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _base_of(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """(sha256, path) of the base an adapt run's record names as its input."""
    entry = next((i for i in record.get("inputs", []) if i.get("role") == "base"), {})
    return entry.get("sha256"), entry.get("path")


def _matches_base(wanted: str, sha: str | None, path: str | None) -> bool:
    """``base=`` names a run's base by its sha256 (or a prefix of 8+ hex digits) or its path (the model file or the
    folder holding it)."""
    if sha and len(wanted) >= 8 and sha.startswith(wanted.lower()):
        return True
    if not path:
        return False
    given = Path(wanted).expanduser().resolve()
    return given in (Path(path), Path(path).parent)


def collect(folders: list[Path], recipe: str | None = None,
            base: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The adapt runs under ``folders`` (recursively) that one learning curve may hold, and those left out.

    A run counts if its record (run.json) says it ended ``ok`` (a killed or failed attempt may have left a
    metrics.json of an earlier one), and it adapted ``recipe``'s data over ``base``. Left unset, recipe and base are
    the sweep's own; runs of several recipes or bases are an error naming them, as one curve cannot mix them.

    Returns:
        (runs: their metrics with ``run_dir``, ``base_sha256`` and ``base_path``; skipped: ``{"run_dir", "reason"}``).
    """
    runs, skipped = [], []
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"sweep={folder}: no such folder")
        for path in sorted(folder.rglob("metrics.json")):
            m = _read(path)
            if m is None or m.get("stage") != "adapt":
                continue
            run = {**m, "run_dir": str(path.parent)}
            record = _read(path.parent / RUN_FILE)
            if record is None:
                skipped.append({"run_dir": run["run_dir"], "reason": f"no readable {RUN_FILE}: nothing records that "
                                                                     f"this run finished"})
            elif record.get("status") != "ok":
                skipped.append({"run_dir": run["run_dir"], "reason": f"its run ended with status "
                                                                     f"{record.get('status')!r}, not 'ok'"})
            else:
                run["base_sha256"], run["base_path"] = _base_of(record)
                runs.append(run)
    where = ", ".join(map(str, folders))
    if not runs:
        raise DataError(f"no adapt runs (metrics.json with stage 'adapt', its run.json saying status 'ok') under "
                        f"{where}" + (f"; left out: {_skipped_text(skipped)}" if skipped else ""))
    runs = _keep(runs, skipped, "recipe", recipe, lambda r: r.get("recipe"), lambda r, want: r.get("recipe") == want)
    runs = _keep(runs, skipped, "base", base, lambda r: r["base_sha256"],
                 lambda r, want: _matches_base(want, r["base_sha256"], r["base_path"]))
    return runs, skipped


def _keep(runs: list[dict[str, Any]], skipped: list[dict[str, str]], key: str, wanted: str | None, group,
          matches) -> list[dict[str, Any]]:
    """The runs whose ``key`` is ``wanted`` (the others go to ``skipped``); unset: the one value all runs share."""
    if wanted is None:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for r in runs:
            groups.setdefault(group(r), []).append(r)
        if len(groups) > 1:
            shown = "; ".join(f"{_label(key, g, rs[0])}: {len(rs)} run(s)" for g, rs in groups.items())
            value = "name" if key == "recipe" else "path or sha256"
            raise DataError(f"the sweep holds adapt runs of {len(groups)} different {key}s ({shown}); one learning "
                            f"curve cannot mix them: choose one with {key}=<{value}>")
        return runs
    kept = [r for r in runs if matches(r, wanted)]
    skipped += [{"run_dir": r["run_dir"], "reason": f"{key} {_label(key, group(r), r)}, not {wanted}"}
                for r in runs if not matches(r, wanted)]
    if not kept:
        raise DataError(f"no adapt run in the sweep has {key}={wanted}; it holds "
                        f"{', '.join(sorted({_label(key, group(r), r) for r in runs}))}")
    return kept


def _label(key: str, value: Any, run: dict[str, Any]) -> str:
    if key == "base":
        return f"{(value or '?')[:12]} ({run.get('base_path')})"
    return repr(value)


def _skipped_text(skipped: list[dict[str, str]], shown: int = 5) -> str:
    text = "; ".join(f"{s['run_dir']}: {s['reason']}" for s in skipped[:shown])
    return text + (f"; and {len(skipped) - shown} more" if len(skipped) > shown else "")


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
    require(cfg, "sweep", "targets", "metric", "recipe", "base")
    out = run_dir(cfg)
    sweep = cfg.sweep
    folders = [Path(p) for p in (sweep if isinstance(sweep, (list, ListConfig)) else [sweep])]
    targets = [float(t) for t in cfg.targets]
    with RunRecord("plan", out, cfg) as record:
        runs, skipped = collect(folders, cfg.recipe, None if cfg.base is None else str(cfg.base))
        if skipped:
            log.warning(f"plan: {len(skipped)} adapt run(s) left out: {_skipped_text(skipped)}")
        for r in runs:
            if (Path(r["run_dir"]) / "run.json").is_file():
                record.add_parent(r["run_dir"])
        summary = summarise(runs, cfg.metric)
        best, needed = labels_needed(summary["curves"], targets)
        recipe = runs[0]["recipe"]
        png = learning_curve_png(summary, out / "learning_curve.png", f"{recipe}: {cfg.metric} vs local labels",
                                 cfg.metric, reference_methods=REFERENCE_METHODS)
        text = plan_markdown(summary, best, needed, targets, cfg.metric)
        if skipped:
            text += (f"\n\n{len(skipped)} adapt run(s) under the sweep were left out:\n\n"
                     + "\n".join(f"- `{s['run_dir']}`: {s['reason']}" for s in skipped))
        write_text_atomic(out / "plan.md", f"# Calibration-size plan: {recipe}\n\n{text}\n\n![learning curve](learning_curve.png)\n")
        result = {"recipe": recipe, "base": {"sha256": runs[0]["base_sha256"], "path": runs[0]["base_path"]},
                  "runs": len(runs), "skipped": skipped, "best": best, "targets": targets,
                  "labels_needed": {m: {str(t): n for t, n in row.items()} for m, row in needed.items()},
                  **summary}
        write_json_atomic(out / "plan.json", result)
        outputs = {"report": out / "plan.md", "plan_json": out / "plan.json", "learning_curve": png}
        for role, path in outputs.items():
            record.add_output(path, "plan" if role == "report" else role)
    return StageResult("plan", out, result, outputs, [("Calibration-size plan", text)])
