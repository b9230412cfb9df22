"""``monitor``'s files: ``monitor.md`` (the verdicts in plain words, the accuracy estimate, the OOD picture) and the
manifest of the most unusual samples (``label_first.csv``)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.lineage import write_text_atomic
from fmtransfer.monitoring.drift import DriftVerdict
from fmtransfer.tasks.model_outputs import ModelOutputs

TEST_NAMES = {"bbsd": "BBSD", "mmd": "MMD", "domain_classifier": "the domain classifier",
              "label_shift": "label shift"}


def _label(outputs: ModelOutputs, i: int) -> str:
    return outputs.classes[int(outputs.targets[i])] if outputs.targets is not None and outputs.classes else ""


def write_ood(out: Path, outputs: ModelOutputs, scores: np.ndarray, threshold: float, size: int) -> dict[str, Path]:
    """``ood_scores.csv`` (every current sample) and ``label_first.csv`` (the ``size`` highest scores, in the
    format of curate's ``curated.csv``: id, path, label, region, then the score)."""
    flags = scores > threshold
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "path", "region", "label", "prediction", "confidence", "ood_score", "ood"])
    for i in range(len(outputs)):
        pred = conf = ""
        if outputs.probs is not None:
            k = int(outputs.probs[i].argmax())
            pred, conf = (outputs.classes[k] if outputs.classes else str(k)), f"{outputs.probs[i, k]:.4f}"
        w.writerow([outputs.ids[i], outputs.paths[i] if outputs.paths else "", outputs.regions[i], _label(outputs, i),
                    pred, conf, f"{scores[i]:.6f}", int(flags[i])])
    files = {"ood_scores": write_text_atomic(out / "ood_scores.csv", buf.getvalue())}
    top = np.argsort(-scores, kind="stable")[:size]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "path", "label", "region", "ood_score"])
    for i in top:
        w.writerow([outputs.ids[i], outputs.paths[i] if outputs.paths else "", _label(outputs, i), outputs.regions[i],
                    f"{scores[i]:.6f}"])
    files["manifest"] = write_text_atomic(out / "label_first.csv", buf.getvalue())
    return files


def verdict_sentence(verdicts: dict[str, DriftVerdict]) -> str:
    """"drift detected by BBSD (p=...) and MMD (p=...)", or "no drift detected ...", in plain words."""
    ran = {k: v for k, v in verdicts.items() if v.skipped is None}
    hit = [f"{TEST_NAMES[k]} (p={v.p_value:.3g})" for k, v in ran.items() if v.detected]
    miss = [f"{TEST_NAMES[k]} (p={v.p_value:.3g})" for k, v in ran.items() if not v.detected]
    if not ran:
        return "no drift test could run"
    if hit:
        text = f"drift detected by {_join(hit)}"
        return text + (f"; not by {_join(miss)}" if miss else "")
    return f"no drift detected: {_join(miss)} all above alpha"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def report_md(m: dict[str, Any]) -> str:
    lines = [f"# fmtransfer monitor: {m['current']['label']} against {m['reference']['label']}", "",
             f"Model: `{m['model']['path']}` ({m['model']['kind']}, sha256 {m['model']['sha256'][:12]}...). "
             f"Reference statistics {m['reference']['statistics']}: `{m['reference']['file']}`.", "",
             f"**{m['summary']}** (alpha {m['settings']['alpha']:g}; {m['reference']['n']} reference and "
             f"{m['current']['n']} current samples).", "",
             "| test | drift | statistic | p-value | n reference | n current | note |", "|---|---|---:|---:|---:|---:|---|"]
    for name, v in m["tests"].items():
        if v["skipped"]:
            lines.append(f"| {name} | skipped | | | | {v['n_current']} | {v['skipped']} |")
        else:
            lines.append(f"| {name} | {'**yes**' if v['detected'] else 'no'} | {v['statistic']:.4g} | "
                         f"{v['p_value']:.3g} | {v['n_reference']} | {v['n_current']} | |")
    acc = m["accuracy"]
    lines += ["", "## Accuracy without labels", ""]
    if "skipped" in acc:
        lines.append(f"Skipped: {acc['skipped']}.")
    else:
        true = f"; true accuracy {acc['true']:.3f} (error {acc['error']:+.3f})" if acc["true"] is not None else \
            " (the current data has no labels)"
        lines.append(f"Estimated accuracy {acc['estimated']:.3f} (temperature {acc['temperature']:.3f} fitted on the "
                     f"reference's labels; uncalibrated mean confidence {acc['uncalibrated_confidence']:.3f}){true}. "
                     f"Under a shift the model never saw, confidence stays high where accuracy falls: read the "
                     f"estimate as an upper bound when drift is detected.")
    ood = m["ood"]
    lines += ["", "## Unusual samples (OOD)", ""]
    if "skipped" in ood:
        lines.append(f"Skipped: {ood['skipped']}.")
    else:
        lines += [f"{ood['flagged']} of {m['current']['n']} current samples ({ood['share']:.1%}) lie farther from the "
                  f"reference than its own {ood['quantile']:.0%} quantile (distance to the {ood['k']}-th nearest "
                  f"embedding of the bank, {ood['bank']}, > {ood['threshold']:.4f}; about {1 - ood['quantile']:.0%} of reference-like "
                  f"data would be). The {ood['manifest_n']} most unusual are in `label_first.csv`: label these first "
                  f"(`adapt calibration.manifest=<this run>/label_first.csv` takes them as its calibration set).", "",
                  "![OOD scores](ood_scores.png)"]
    if m.get("windows"):
        lines += ["", "## Over time", "", f"{len(m['windows'])} windows of about {m['settings']['window_size']} "
                  f"samples ordered by `{m['settings']['window_order']}`; drift in "
                  f"{sum(any(t['detected'] for t in w['tests'].values()) for w in m['windows'])} of them.", "",
                  "![windows](windows.png)"]
    return "\n".join(lines) + "\n"
