"""``report.md`` and its self-contained twin ``report.html``: what a pipeline run found, as tables and pictures,
with its lineage."""

from __future__ import annotations

import base64
import html
import logging
import mimetypes
import os
import re
from pathlib import Path
from typing import Any

from fmtransfer.lineage import write_text_atomic
from fmtransfer.lineage.record import git_state

log = logging.getLogger(__name__)

HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ccc; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; } th { background: #f3f3f3; }
td { text-align: right; } td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 0 0.2em; } pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; }
.missing { color: #b00; font-weight: bold; }
"""
# marks the page with how many pictures loaded (the headless-browser test reads it) and names a broken one in red
HTML_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images), ok = 0;
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; return; }
    var note = document.createElement("p");
    note.className = "missing";
    note.textContent = "picture did not load: " + (img.alt || "");
    img.parentNode.insertBefore(note, img.nextSibling);
  });
  document.documentElement.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""
_IMG = re.compile(r'(<img\b[^>]*?\bsrc=")([^"]+)(")')


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
    written = write_text_atomic(path, "\n".join(lines))
    write_html_report(written, title)
    return written


def _inline(match: re.Match, folder: Path, missing: list[str]) -> str:
    src = html.unescape(match.group(2))
    if src.startswith(("data:", "http://", "https://")):
        return match.group(0)
    file = (folder / src).resolve()
    if not file.is_file():
        missing.append(src)
        return match.group(0)
    kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    data = base64.b64encode(file.read_bytes()).decode("ascii")
    return f"{match.group(1)}data:{kind};base64,{data}{match.group(3)}"


def write_html_report(md_path: Path, title: str) -> Path | None:
    """``report.html`` beside ``md_path``: the same report as one self-contained page (pictures inlined as data URIs,
    no external file, script or style), for a person to open or mail. Returns None, with a warning, when the markdown
    package is missing; a picture that cannot be found is left as a link and named in a warning."""
    try:
        import markdown
    except ImportError:
        log.warning("report.html not written: the 'markdown' package is not installed (pip install markdown)")
        return None
    body = markdown.markdown(md_path.read_text(), extensions=["tables", "fenced_code", "sane_lists"])
    missing: list[str] = []
    body = _IMG.sub(lambda m: _inline(m, md_path.parent, missing), body)
    if missing:
        log.warning("report.html: %d picture(s) not found beside %s: %s", len(missing), md_path,
                    ", ".join(missing[:5]))
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style><script>{HTML_SCRIPT}</script></head>"
            f"<body>\n{body}\n</body></html>\n")
    return write_text_atomic(md_path.with_suffix(".html"), page)
