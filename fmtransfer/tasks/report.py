"""``report.md``: what a pipeline run found, as a table and pictures, with its lineage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fmtransfer.lineage import write_text_atomic
from fmtransfer.lineage.record import git_state


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_table(rows: list[dict[str, Any]], task: str) -> str:
    """Markdown table; each row: {model, data, region, split, metrics}."""
    cols = ["accuracy", "macro_f1"] if task == "classification" else ["r2", "mae", "rmse"]
    lines = ["| model | data | region | split | n | " + " | ".join(cols) + " |",
             "|---|---|---|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['model']} | {r['data']} | {r['region']} | {r['split']} | {m['n']} | "
                     + " | ".join(_fmt(m[c]) for c in cols) + " |")
    return "\n".join(lines)


def metric_rows(model: str, data: str, split: str, scored: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for a scored result: overall, plus one per region when there are several."""
    regions = scored["regions"]
    rows = [{"model": model, "data": data, "region": ", ".join(regions) if len(regions) == 1 else "all",
             "split": split, "metrics": scored["overall"]}]
    if len(regions) > 1:
        rows += [{"model": model, "data": data, "region": name, "split": split, "metrics": m}
                 for name, m in regions.items()]
    return rows


def write_report(path: Path, *, title: str, run: dict[str, Any], sections: list[tuple[str, str]],
                 images: list[tuple[str, Path]]) -> Path:
    """Write the markdown report to ``path`` (atomically) and return it; image paths are written relative to it.

    Args:
        run: the run record's data (``run_dir``, ``run_id``, ``config_hash``).
        sections: ``(heading, markdown)`` in order.
        images: ``(caption, file)`` pictures, shown after the sections.
    """
    git = git_state()
    lines = [f"# {title}", "",
             f"- run dir: `{run['run_dir']}`", f"- run id: `{run['run_id']}`",
             f"- config hash: `{run['config_hash'][:16]}`",
             f"- code: `{git['commit'] or 'not a git checkout'}`" + (" (uncommitted changes)" if git["dirty"] else ""),
             ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body, ""]
    if images:
        lines += ["## Pictures", ""]
        for caption, image in images:
            rel = os.path.relpath(image, path.parent)
            lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]
    return write_text_atomic(path, "\n".join(lines))
