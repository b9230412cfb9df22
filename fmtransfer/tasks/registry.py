"""``fmtransfer registry <action> [artifact] [key=value ...]``: list, show, trace, verify, promote and roll back the
artifacts that the stages registered (:mod:`fmtransfer.lineage.registry`).

Promotion is gated: an ONNX export reaches a region's ``production`` only if its bytes are the registered ones,
its export gates passed, its adapter beat its base (do-no-harm, when it had one) and the latest shadow run that
compared it with production recommended it (when one did). Every decision, accepted or refused, is appended to the
history with its evidence.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage.io import atomic_path
from fmtransfer.lineage.record import load_record
from fmtransfer.lineage.registry import Artifact, Registry, register_run, resolve_path
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)

ACTIONS = ("list", "show", "lineage", "verify", "promote", "rollback", "history", "add")
STAGES = ("staging", "production")
SHADOW_PROMOTE = "promote"  # fmtransfer.tasks.shadow's recommendation that backs a promotion


def registry(cfg: DictConfig) -> StageResult:
    """Run one registry action; prints its answer and returns it as the result's metrics."""
    action = str(cfg.action)
    if action not in ACTIONS:
        raise ConfigError(f"registry: unknown action {action!r}; choose one of: {', '.join(ACTIONS)}")
    path = resolve_path(cfg.registry)
    if path is None:
        raise ConfigError("registry: no registry file (registry=off or FMTRANSFER_REGISTRY=off); pass "
                          "registry=<file.sqlite>")
    if action != "add" and not path.is_file():
        raise ArtifactError(f"registry {path} does not exist yet: stages register what they make when they end "
                            f"(or `fmtransfer registry add <run dir>`)")
    out = Path(cfg.run_dir)
    with Registry(path) as reg:
        answer, files = _ACTIONS[action](reg, cfg, out)
    return StageResult("registry", out, answer, files)


def _need(cfg: DictConfig, key: str, action: str) -> str:
    value = cfg.get(key)
    if value is None or str(value) == "":
        shown = "region" if key == "region_name" else key  # what the user types (cli.KEY_ALIASES)
        example = "<sha256, its first 6+ digits, or a file>" if key == "artifact" else "region=<region>"
        raise ConfigError(f"registry {action}: missing {shown}; pass `fmtransfer registry {action} {example}`")
    return str(value)


def headline(a: Artifact) -> str:
    """One figure that says most about an artifact: its test accuracy, an export's gates, a shadow verdict."""
    test = a.metrics.get("test") if isinstance(a.metrics.get("test"), dict) else {}
    if isinstance(test.get("accuracy"), (int, float)):
        return f"acc {test['accuracy']:.4f}"
    if isinstance(a.metrics.get("passed"), bool):
        return "gates ok" if a.metrics["passed"] else "REJECTED"
    if a.metrics.get("recommendation"):
        return str(a.metrics["recommendation"])
    if isinstance(a.metrics.get("drift"), bool):
        return "drift" if a.metrics["drift"] else "no drift"
    return "-"


def _row(a: Artifact) -> str:
    return (f"{a.short}  {a.kind:<17} {a.region or '-':<12} {headline(a):<15} {a.created[:19]}  "
            f"{a.path or a.name or '-'}")


# --- actions ----------------------------------------------------------------------------------------------
def _list(reg: Registry, cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    rows = reg.list(kind=cfg.kind, region=cfg.region_name)
    print(f"{'sha256':<12}  {'kind':<17} {'region':<12} {'headline':<15} {'created (UTC)':<19}  path")
    for a in rows:
        print(_row(a))
    print(f"{len(rows)} artifact(s) in {reg.path}")
    return {"artifacts": [a.sha256 for a in rows]}, {}


def _show(reg: Registry, cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    a = reg.find(_need(cfg, "artifact", "show"))
    shown = {**{k: v for k, v in vars(a).items()},
             "parents": [{"sha256": p.sha256, "kind": p.kind, "role": r} for p, r in reg.parents(a.sha256)],
             "children": [{"sha256": c.sha256, "kind": c.kind, "role": r} for c, r in reg.children(a.sha256)]}
    print(json.dumps(shown, indent=2, default=str))
    return shown, {}


def _lineage(reg: Registry, cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    a = reg.find(_need(cfg, "artifact", "lineage"))
    lines, nodes, edges = lineage_tree(reg, a)
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    graph = Path(cfg.graph) if cfg.get("graph") else out / "lineage.png"
    files = {"lineage": _write_text(out / "lineage.txt", text + "\n"), "graph": lineage_png(nodes, edges, graph)}
    print(f"graph: {files['graph']}")
    return {"artifact": a.sha256, "nodes": list(nodes), "edges": edges}, files


def _verify(reg: Registry, cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    checks = reg.verify(threads=int(cfg.threads))
    bad = [c for c in checks if c.status != "ok"]
    for c in bad:
        print(f"{c.status.upper():<9} {c.artifact.describe()}: {c.path}")
    print(f"verified {len(checks)} file(s) of {reg.path}: {len(checks) - len(bad)} ok, "
          f"{sum(c.status == 'tampered' for c in bad)} tampered, {sum(c.status == 'missing' for c in bad)} missing")
    if bad:
        raise ArtifactError(f"registry verify: {len(bad)} of {len(checks)} file(s) failed: " + "; ".join(
            f"{c.path} {c.status}" for c in bad[:5]) + (" ..." if len(bad) > 5 else ""))
    return {"files": len(checks), "problems": []}, {}


def _add(reg: Registry, cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    run = Path(_need(cfg, "artifact", "add")).expanduser()
    record = load_record(run)
    if record.get("status") != "ok":
        raise ArtifactError(f"registry add: {run} ended {record.get('status')!r}; only a finished (ok) run registers")
    made = register_run(reg, {**record, "run_dir": str(run.resolve())})
    print(f"registered {len(made)} artifact(s) of {run} in {reg.path}")
    return {"artifacts": made}, {}


def _history(reg: Registry, cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    rows = reg.history(cfg.region_name)
    for r in rows:
        reason = r["evidence"].get("reason", "")
        print(f"#{r['id']:<4} {r['created'][:19]}  {r['region']:<10} {r['stage']:<10} {r['action']:<8} "
              f"{r['sha256'][:12]}  {r['decision']:<8} {reason}")
    if cfg.region_name is not None:
        for stage in STAGES:
            stack = reg.production_stack(str(cfg.region_name), stage)
            if stack:
                print(f"{stage} now: {stack[-1][:12]}")
    print(f"{len(rows)} history row(s)")
    return {"history": rows}, {}


def _promote(reg: Registry, cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    region, stage = _need(cfg, "region_name", "promote"), _stage(cfg)
    a = reg.find(_need(cfg, "artifact", "promote"))
    if a.kind != "onnx":
        raise ArtifactError(f"registry promote: {a.describe()} is not an ONNX export; a region runs an exported "
                            f"model (`fmtransfer registry list kind=onnx region={region}`)")
    if a.region != region:
        raise ArtifactError(f"registry promote: {a.describe()} was made for region {a.region!r}, not {region!r}; "
                            f"promote an export gated on {region!r}'s data")
    stack = reg.production_stack(region, stage)
    previous = stack[-1] if stack else None
    if previous == a.sha256:
        raise ArtifactError(f"registry promote: {a.describe()} is already {region}'s {stage} artifact")
    gates = promotion_gates(reg, a)
    failed = [g for g in gates if g["passed"] is False]
    decision = "refused" if failed else "accepted"
    reason = ("; ".join(f"{g['name']}: {g['detail']}" for g in failed) if failed
              else f"all gates held ({', '.join(g['name'] for g in gates if g['passed'])})")
    evidence = {"gates": gates, "reason": reason, "path": a.path, "replaces": previous}
    entry = reg.record_decision(region, stage, "promote", a.sha256, decision, evidence, previous)
    if failed:
        raise ArtifactError(f"registry promote: refused {a.describe()} for {region} {stage}: {reason} "
                            f"(history #{entry})")
    print(f"promoted {a.describe()} to {region} {stage} (history #{entry}; replaces "
          f"{previous[:12] if previous else 'nothing'}): {reason}")
    return {"decision": decision, "history_id": entry, "sha256": a.sha256, "evidence": evidence}, {}


def _rollback(reg: Registry, cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    region, stage = _need(cfg, "region_name", "rollback"), _stage(cfg)
    stack = reg.production_stack(region, stage)
    if len(stack) < 2:
        now = f"{stack[0][:12]} is the first it had" if stack else "nothing was ever promoted there"
        raise ArtifactError(f"registry rollback: region {region!r} has no earlier {stage} artifact to return to "
                            f"({now}; `fmtransfer registry history region={region}`)")
    current, target = stack[-1], stack[-2]
    back = reg.get(target)
    integrity = _integrity(back)
    if not integrity["passed"]:
        raise ArtifactError(f"registry rollback: the earlier {stage} artifact {back.describe()} fails its check "
                            f"({integrity['detail']}); restore its file first (`fmtransfer registry verify`)")
    evidence = {"reason": f"rolled back from {current[:12]} to {target[:12]}", "integrity": integrity,
                "path": back.path, "replaces": current}
    entry = reg.record_decision(region, stage, "rollback", target, "accepted", evidence, current)
    print(f"rolled {region} {stage} back to {back.describe()} (history #{entry}; was {current[:12]})")
    return {"sha256": target, "history_id": entry, "replaced": current}, {}


def _stage(cfg: DictConfig) -> str:
    stage = str(cfg.release_stage)
    if stage not in STAGES:
        raise ConfigError(f"registry: stage={stage!r} (release_stage): expected one of {', '.join(STAGES)}")
    return stage


_ACTIONS = {"list": _list, "show": _show, "lineage": _lineage, "verify": _verify, "add": _add, "history": _history,
            "promote": _promote, "rollback": _rollback}


# --- gates ------------------------------------------------------------------------------------------------
def _integrity(a: Artifact) -> dict[str, Any]:
    from fmtransfer.lineage.io import sha256_file

    path = a.path
    if path is None or not Path(path).is_file():
        return {"name": "integrity", "passed": False, "detail": f"file missing ({path})"}
    digest = sha256_file(path)
    if digest != a.sha256:
        return {"name": "integrity", "passed": False,
                "detail": f"{path} now has sha256 {digest[:12]}..., registered {a.sha256[:12]}...: tampered"}
    return {"name": "integrity", "passed": True, "detail": f"{path} sha256 {digest[:12]}... as registered"}


def promotion_gates(reg: Registry, a: Artifact) -> list[dict[str, Any]]:
    """The checks that a promotion of ``a`` (an ONNX export) must pass, each ``{name, passed, detail}``;
    ``passed`` None: the check does not apply (no adapter, no shadow run)."""
    integrity = _integrity(a)
    if not integrity["passed"]:
        return [integrity]
    from fmtransfer.export.runtime import OnnxModel

    try:  # the embedded metadata's seal and the sidecar's, the bytes against the sidecar
        meta = OnnxModel.load(a.path, force=True).meta
    except ArtifactError as e:
        return [integrity, {"name": "metadata", "passed": False, "detail": str(e)}]
    return [integrity, _export_gates(meta, Path(a.path)), _do_no_harm(meta), _shadow(reg, a)]


def _export_gates(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    gates = meta.get("gates") or []
    failed = [g for g in gates if isinstance(g, dict) and not g.get("passed")]
    rejected = path.parent.name == "rejected"
    passed = meta.get("gates_passed") is True and not failed and not rejected and bool(gates)
    detail = ("; ".join(f"{g.get('name')} {g.get('value')} (limit {g.get('threshold')})" for g in failed)
              or ("in a rejected/ folder" if rejected else "")
              or ("no gates recorded" if not gates else f"{len(gates)} gate(s) passed"))
    return {"name": "export_gates", "passed": passed, "detail": detail, "gates": gates}


def _do_no_harm(meta: dict[str, Any]) -> dict[str, Any]:
    result = meta.get("do_no_harm")
    if result is None:
        return {"name": "do_no_harm", "passed": None, "detail": "no adapter: the check does not apply"}
    beats = isinstance(result, dict) and result.get("beats_base") is True
    detail = (f"beats_base={result.get('beats_base')}, verdict {result.get('verdict')!r}"
              + (" (released with force=true)" if result.get("forced") else "")) if isinstance(result, dict) else \
        f"unreadable do_no_harm {result!r}"
    return {"name": "do_no_harm", "passed": beats, "detail": detail, "result": result}


def _shadow(reg: Registry, a: Artifact) -> dict[str, Any]:
    runs = [c for c, role in reg.children(a.sha256, kind="shadow_report") if role == "candidate"]
    if not runs:
        return {"name": "shadow", "passed": None, "detail": "no shadow run compared it with production"}
    latest = runs[-1]
    verdict = latest.metrics.get("recommendation")
    return {"name": "shadow", "passed": verdict == SHADOW_PROMOTE,
            "detail": f"latest shadow run {latest.run_dir}: {verdict!r}", "report": latest.sha256,
            "reasons": latest.metrics.get("reasons")}


# --- lineage ----------------------------------------------------------------------------------------------
def lineage_tree(reg: Registry, root: Artifact) -> tuple[list[str], dict[str, dict[str, Any]],
                                                         list[tuple[str, str, str]]]:
    """The text tree from ``root`` back to its data (each node once; a repeat says so), its nodes and edges."""
    nodes: dict[str, dict[str, Any]] = {}
    edges: list[tuple[str, str, str]] = []
    lines: list[str] = []

    def label(a: Artifact) -> str:
        return f"{a.kind} {a.short} {a.name or ''} [region {a.region or '-'}]".replace("  ", " ")

    def walk(a: Artifact, prefix: str, tail: str, role: str) -> None:
        seen = a.sha256 in nodes
        lines.append(f"{prefix}{tail}{f'({role}) ' if role else ''}{label(a)}{' (above)' if seen else ''}")
        if seen:
            return
        nodes[a.sha256] = {"kind": a.kind, "name": a.name, "region": a.region, "path": a.path, "run_dir": a.run_dir}
        parents = reg.parents(a.sha256)
        child_prefix = prefix + ("    " if tail in ("└── ", "") else "│   ")
        for i, (p, r) in enumerate(parents):
            edges.append((p.sha256, a.sha256, r))
            walk(p, child_prefix if tail else "", "└── " if i == len(parents) - 1 else "├── ", r)

    walk(root, "", "", "")
    return lines, nodes, edges


def lineage_png(nodes: dict[str, dict[str, Any]], edges: list[tuple[str, str, str]], path: Path) -> Path:
    """The lineage as a layered graph: data on the left, the artifact asked about on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = _depths(nodes, edges)
    top = max(depth.values(), default=0)
    layers: dict[int, list[str]] = {}
    for sha in nodes:
        layers.setdefault(depth[sha], []).append(sha)
    pos = {sha: (top - d, (len(shas) - 1) / 2 - i) for d, shas in layers.items() for i, sha in enumerate(shas)}
    height = max((len(v) for v in layers.values()), default=1)
    fig, ax = plt.subplots(figsize=(3.2 * (top + 1) + 1, 1.2 * height + 1))
    for parent, child, role in edges:
        (x0, y0), (x1, y1) = pos[parent], pos[child]
        ax.annotate("", xy=(x1 - 0.32, y1), xytext=(x0 + 0.32, y0),
                    arrowprops={"arrowstyle": "->", "color": "0.45", "shrinkA": 0, "shrinkB": 0})
        if role:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, role, fontsize=6, color="0.35", ha="center", va="bottom")
    colours = {"data": "#cfe8cf", "onnx": "#f6d7a7", "adapter": "#d7e3f6", "base": "#e6d7f6"}
    for sha, node in nodes.items():
        x, y = pos[sha]
        text = f"{node['kind']}\n{sha[:12]}\n{(node['name'] or '')[:28]}"
        ax.text(x, y, text, ha="center", va="center", fontsize=7, family="monospace",
                bbox={"boxstyle": "round", "facecolor": colours.get(node["kind"], "#eeeeee"), "edgecolor": "0.4"})
    ax.set_xlim(-0.6, top + 0.6)
    ax.set_ylim(-height / 2 - 0.2, height / 2 + 0.2)
    ax.axis("off")
    ax.set_title("fmtransfer lineage (data -> artifact)", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _depths(nodes: dict[str, Any], edges: list[tuple[str, str, str]]) -> dict[str, int]:
    """Each node's longest distance from the root (the artifact asked about), so a parent lies left of its child."""
    children = {}
    for parent, child, _ in edges:
        children.setdefault(parent, set()).add(child)
    depth: dict[str, int] = {}

    def of(sha: str, trail: frozenset) -> int:
        if sha not in depth:
            kids = [c for c in children.get(sha, ()) if c not in trail]
            depth[sha] = 1 + max((of(c, trail | {sha}) for c in kids), default=-1)
        return depth[sha]

    for sha in nodes:
        of(sha, frozenset())
    return depth


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path

