"""The pipeline's ``report.md`` (and ``report.html``) from its steps' results.

One region: the global model and the region in one results table, then the region's sections. Several regions: the
global model, a table with one row per region, then each region's own results and sections under its name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fmtransfer.adapters.harm import DoNoHarmRefused, describe, unchecked
from fmtransfer.lineage import RunRecord
from fmtransfer.tasks.export import GateFailed
from fmtransfer.tasks.pipeline_region import PROBE_NAMES
from fmtransfer.tasks.pipeline_steps import Region, Steps
from fmtransfer.tasks.report import metric_rows, results_table, write_report
from fmtransfer.tasks.result import StageResult

log = logging.getLogger(__name__)

Rejection = GateFailed | DoNoHarmRefused


class _Scored:
    """One region's results, by role."""

    def __init__(self, steps: Steps, region: Region) -> None:
        results = steps.results
        self.region = region
        self.zero = results.get(region.step("zero_shot")) or results.get(region.step("probe"))
        self.probed = region.step("probe") in results
        self.adapt = results[region.released_step]
        self.plan = results[region.step("plan")]
        self.exported = results.get(region.step("export"))
        self.monitored = results.get(region.step("monitor"))
        settings = region.settings
        self.regional = {size: (results[region.adapt_step(adapter, size)], results[region.regional_step(adapter, size)])
                         for adapter, size in settings.regional_runs()}


def write(steps: Steps, record: RunRecord, rejected: dict[str, Rejection]) -> StageResult:
    """``report.md`` from the steps' results: the global model (and its curation), then the regions; tables, their
    sections, pictures and the stages' folders.

    Args:
        rejected: region label -> its rejected export or refused adapter.
    """
    results = steps.results
    pre, task = results["pretrain"], results["pretrain"].metrics["task"]
    curated, curated_pre = results.get("curate"), results.get("pretrain_curated")
    scored = [_Scored(steps, region) for region in steps.regions]
    rows = _global_rows(pre, curated, curated_pre)
    curation = curated.sections if curated else []
    if len(scored) == 1 and not scored[0].region.name:  # the one region of region=: one table, its sections
        one = scored[0]
        sections = [("Setup", _global_setup(pre) + _region_setup(one, steps, joined=True)),
                    ("Results", results_table(rows + _region_rows(pre, one), task)), *curation,
                    *_region_sections(one, steps, rejected.get(one.region.label), "", task)]
    else:
        names = ", ".join(f"`{s.region.label}`" for s in scored)
        sections = [("Setup", f"{_global_setup(pre)}. Then {len(scored)} regions, one after another, each over this "
                              f"global model: {names}."),
                    ("Results", results_table(rows, task)), ("Regions", _regions_table(scored, rejected, task)),
                    *curation]
        for one in scored:
            label = one.region.label
            sections.append((f"Region {label}", _region_setup(one, steps, joined=False) + "\n\n" +
                             results_table(_region_rows(pre, one), task)))
            sections += _region_sections(one, steps, rejected.get(label), f"{label}: ", task)
    sections.append(("Stages", _stages(pre, curated, scored, steps, rejected)))
    images = [("Global test split", pre.outputs.get("confusion")),
              ("Training curves", pre.outputs.get("training_curves"))]
    if curated:
        images += [("Curation: cluster sizes", curated.outputs.get("cluster_sizes")),
                   ("Curation: PCA map", curated.outputs.get("pca"))]
    for one in scored:
        images += _region_images(one, steps, rejected.get(one.region.label), len(scored) > 1 or bool(one.region.name))
    report = write_report(steps.out / "report.md", title="fmtransfer pipeline report", run=record.data,
                          sections=sections, images=[(c, p) for c, p in images if p is not None])
    record.add_output(report, "report")
    adapters = {one.region.step("adapt"): one.adapt for one in scored}  # "adapt": the region's own adapter
    return StageResult("pipeline", steps.out, outputs={"report": report}, sections=sections,
                       steps={**results, **adapters})


def _global_setup(pre: StageResult) -> str:
    pm = pre.metrics
    data = pm["data"]
    return (f"Backbone `{pm['backbone']}` trained on `{pm['recipe']}` ({data['splits']['train']} train / "
            f"{data['splits']['val']} val / {data['splits']['test']} test images) for {pm['epochs']} epochs in "
            f"{pm['fit_seconds']:.0f} s ({pm['train_images_per_s']['median'] or 0:.0f} images/s)")


def _region_setup(one: _Scored, steps: Steps, joined: bool) -> str:
    """How the region was scored and adapted; ``joined``: it follows the global setup's sentence."""
    zero, am, region = one.zero, one.adapt.metrics, one.region
    if region.step("zero_shot") in steps.results:
        scored = (f"{', then scored' if joined else 'The global model scored'} without any adaptation on "
                  f"`{zero.metrics['recipe']}` ({zero.metrics['overall']['n']} {zero.metrics['split']} images).")
    else:  # plainly: no zero-shot, and what stands in for it
        scored = f"{'. ' if joined else ''}**No zero-shot score**: {steps.skipped[region.step('zero-shot')]}."
    return (f"{scored} The region's adapter (`{am['method']}`, {am['calibration']['size']} "
            f"{am['calibration']['strategy']} labels from the region's train split) trains "
            f"{am['trainable_fraction']:.2%} of the parameters and is one {am['adapter_bytes'] / 1e6:.2f} MB file "
            f"({am['adapter_to_base']:.1%} of the base).")


def _global_rows(pre: StageResult, curated: StageResult | None, curated_pre: StageResult | None) -> list[dict]:
    pm = pre.metrics
    rows = metric_rows(f"global {pm['backbone']}", pm["recipe"], "test", pm["test"])
    if curated and curated_pre:
        cm = curated_pre.metrics
        rows += metric_rows(f"global {pm['backbone']}, curated {curated.metrics['fraction']:.0%} of the train split "
                            f"({cm['global_step']} steps vs {pm['global_step']})", pm["recipe"], "test", cm["test"])
    return rows


def _region_rows(pre: StageResult, one: _Scored) -> list[dict]:
    pm, am, zero = pre.metrics, one.adapt.metrics, one.zero
    rows = []
    if zero is not None and one.probed:  # the probe, in zero-shot's place
        zm = zero.metrics
        rows += metric_rows(f"global {pm['backbone']}, {probe_label(zero)} on the {am['calibration']['size']} "
                            f"calibration labels (no zero-shot: new classes)", zm["recipe"], zm["split"], zm)
    elif zero is not None:
        zm = zero.metrics
        rows += metric_rows(f"global {pm['backbone']}, zero-shot", zm["recipe"], zm["split"], zm)
    rows += metric_rows(f"+ {am['method']} adapter, {am['calibration']['size']} labels", am["recipe"], "test",
                        am["test"])
    with_regional = one.regional.get(one.region.settings.calibration.size)
    if with_regional is not None:
        rm = with_regional[1].metrics
        rows += metric_rows(f"+ {rm['method']} adapter, {rm['calibration']['size']} labels, after regional "
                            f"pretraining ({rm['regional_pretrain']['epochs']} DINO epochs)", rm["recipe"], "test",
                            rm["test"])
    return rows


def _score(metrics: dict[str, Any], task: str) -> float | None:
    overall = metrics.get("overall") or {}
    return overall.get("accuracy" if task == "classification" else "r2")


def _regions_table(scored: list[_Scored], rejected: dict[str, Rejection], task: str) -> str:
    """One row per region: its base score, its adapter's, whether it beat its base, the export and the monitor."""
    key = "accuracy" if task == "classification" else "R^2"
    lines = [f"| region | recipe | classes | base on the region | adapter | test {key} | change | do no harm | "
             f"edge export | monitoring |", "|---|---|---|---|---|---:|---:|---|---|---|"]
    for one in scored:
        fit, am = one.region.fit, one.adapt.metrics
        base = _score(one.zero.metrics, task) if one.zero else None
        adapted = _score(am["test"], task)
        kind = "probe" if one.probed else "zero-shot"
        classes = f"{len(fit.region_classes)}" + (f" ({len(fit.new_classes)} new)" if fit.new_classes else "") \
            if fit.region_classes else "–"
        harm = am.get("do_no_harm") or {}
        verdict = harm.get("verdict", "not checked") if harm.get("checked") else "not checked"
        lines.append(f"| {one.region.label} | {fit.region_recipe} | {classes} | "
                     f"{f'{base:.4f} ({kind})' if base is not None else '–'} | {am['method']}, "
                     f"{am['calibration']['size']} labels | {adapted:.4f} | "
                     f"{f'{adapted - base:+.4f}' if base is not None else '–'} | {verdict} | "
                     f"{_export_cell(one, rejected.get(one.region.label))} | {_monitor_cell(one)} |")
    return "\n".join(lines)


def _export_cell(one: _Scored, rejected: Rejection | None) -> str:
    if isinstance(rejected, DoNoHarmRefused):
        return "refused: the adapter does not beat its base"
    if one.exported is None:
        return "off" if not one.region.settings.export_region_model else "not run"
    em = one.exported.metrics
    int8 = next((v for v in em.get("variants", []) if v["variant"].startswith("ONNX INT8")), None)
    size = f"INT8 {int8['mb']:.2f} MB" if int8 and int8.get("mb") else f"fp32 {em['sizes_bytes']['fp32'] / 1e6:.2f} MB"
    return f"**rejected** ({size})" if rejected is not None else f"{size}, gates passed"


def _monitor_cell(one: _Scored) -> str:
    if one.monitored is None:
        return "off" if not one.region.settings.monitor_region else "skipped"
    m = one.monitored.metrics
    ood = m.get("ood") or {}
    share = f", {ood['share']:.0%} OOD" if ood.get("share") is not None else ""
    return ("drift" if m.get("drift") else "no drift") + share


def _region_sections(one: _Scored, steps: Steps, rejected: Rejection | None, prefix: str,
                     task: str) -> list[tuple[str, str]]:
    """The region's own sections, headings after ``prefix``: regional pretraining, monitoring, do no harm, the plan's,
    the export's."""
    region = one.region
    sections = []
    if one.regional:
        sections.append((f"{prefix}Regional pretraining", _regional_section(one.regional, task)))
    if one.monitored:
        sections.append((f"{prefix}Monitoring: the region against the global data",
                         _monitor_section(one.monitored, steps.notes.get(region.step("monitoring")))))
    elif region.step("monitoring") in steps.skipped:
        sections.append((f"{prefix}Monitoring: the region against the global data",
                         f"**Skipped**: {steps.skipped[region.step('monitoring')]}."))
    sections.append((f"{prefix}Do no harm",
                     _harm_section(one.adapt, rejected if isinstance(rejected, DoNoHarmRefused) else None)))
    sections += [(f"{prefix}{heading}", body) for heading, body in one.plan.sections]
    if one.exported is not None:
        sections += [(f"{prefix}{heading}", body if rejected is None else f"**Rejected**: {rejected}\n\n{body}")
                     for heading, body in one.exported.sections]
    return sections


def _region_images(one: _Scored, steps: Steps, rejected: Rejection | None, named: bool) -> list[tuple[str, Any]]:
    label = f"{one.region.label}: " if named else ""
    am, zero = one.adapt.metrics, one.zero
    images = []
    if zero is not None:
        what = probe_label(zero).capitalize() if one.probed else "Zero-shot"
        images.append((f"{label}{what} on {zero.metrics['recipe']}", zero.outputs.get("confusion")))
    images += [(f"{label}{am['method']} adapter on {am['recipe']}", one.adapt.outputs.get("confusion")),
               (f"{label}Accuracy against local labels", one.plan.outputs.get("learning_curve"))]
    if one.monitored:
        images.append((f"{label}Monitoring: OOD scores, global reference against the region",
                       one.monitored.outputs.get("ood_plot")))
    released = one.exported.outputs.get("model") if one.exported and rejected is None else one.adapt.outputs.get(
        "adapter")
    picture = steps.out / (f"lineage_{one.region.name}.png" if one.region.name else "lineage.png")
    images.append((f"{label}Lineage: the region's model back to its data (the registry)",
                   _lineage_picture(released, picture)))
    return images


def _stages(pre: StageResult, curated: StageResult | None, scored: list[_Scored], steps: Steps,
            rejected: dict[str, Rejection]) -> str:
    lines = [f"- pretrain: `{pre.run_dir}`", *([f"- curation: `{curated.outputs['manifest']}`"] if curated else [])]
    for one in scored:
        region, zero = one.region, one.zero
        named = f" ({region.label})" if region.name else ""
        refusal = rejected.get(region.label)
        lines += [
            f"- zero-shot{named}: " + (f"`{zero.run_dir}`" if region.step("zero_shot") in steps.results else
                                       "skipped, the global head cannot score the region (see Setup)")
            + (f"; {probe_label(zero)}: `{zero.run_dir}`" if one.probed else ""),
            *([f"- monitoring{named}: `{one.monitored.run_dir}`"] if one.monitored else []),
            *([f"- monitoring{named}: skipped (see its section)"] if region.step("monitoring") in steps.skipped
              else []),
            f"- region adapter{named}: `{one.adapt.outputs['adapter']}`",
            f"- adaptation sweep{named}: `{steps.out / region.step('adapt')}`",
            *([f"- with regional pretraining{named}: `{steps.out / region.step('adapt_regional')}`"]
              if one.regional else []),
            f"- plan{named}: `{one.plan.run_dir}`",
            *([f"- edge export{named}: refused, the adapter does not beat its base (force=true overrides)"]
              if isinstance(refusal, DoNoHarmRefused) else []),
            *([f"- edge export{named}: rejected, `{one.exported.run_dir / 'rejected'}`" if refusal is not None
               else f"- edge export{named}: `{one.exported.outputs['model']}`"] if one.exported else [])]
    if steps.reused:
        lines.append(f"- reused, nothing they read changed ({len(steps.reused)} of {len(steps.results)} steps; "
                     f"`rerun=[<step>]` runs one again): " + ", ".join(f"{n} (`{p}`)" for n, p in steps.reused.items()))
    return "\n".join(lines)


def _lineage_picture(artifact: Path | None, path: Path) -> Path | None:
    """The registry's lineage graph of ``artifact`` (the released ONNX, else the region's adapter) from the registry
    the steps registered into (``$FMTRANSFER_REGISTRY`` or the default), or None with a log line when there is none
    or it does not know the file."""
    from fmtransfer.lineage.registry import Registry, resolve_path
    from fmtransfer.tasks.registry import lineage_png, lineage_tree

    where = resolve_path(None)
    if artifact is None or where is None or not where.is_file():
        return None
    try:
        with Registry(where) as reg:
            _, nodes, edges = lineage_tree(reg, reg.find(str(artifact)))
            return lineage_png(nodes, edges, path)
    except Exception as e:  # noqa: BLE001 - the report goes on without the picture
        log.warning("pipeline: no lineage picture in report.md (%s: %s)", type(e).__name__, e)
        return None


def _monitor_section(monitored: StageResult, note: str | None) -> str:
    """The monitor's own section, after what the pipeline changed in it (a region with classes of its own)."""
    body = _without_images(monitored.sections[0][1])
    return f"**Region with classes of its own**: {note}.\n\n{body}" if note else body


def _without_images(markdown: str) -> str:
    """A step's report section without its pictures (their links are relative to the step's own folder, and the
    pipeline's report shows the pictures itself), its headings one level down, inside the pipeline's section."""
    return "\n".join(f"#{line}" if line.startswith("#") else line for line in markdown.splitlines()
                     if not line.lstrip().startswith("!["))


def _harm_section(region: StageResult, refused: DoNoHarmRefused | None) -> str:
    """The region's adapter against its base on the calibration set (adapt's do_no_harm), and what export made of
    it."""
    harm = region.metrics.get("do_no_harm") or unchecked("no do_no_harm record")
    body = f"The region's adapter against its base: {describe(harm)}."
    if harm.get("checked"):
        body += (f" Interval: {harm['interval_method']}. beats_base is true only when the whole interval lies above "
                 f"0 (docs/do_no_harm.md).")
    if refused is not None:
        body += f"\n\n**Not exported**: {refused}"
    return body


def probe_label(probe: StageResult) -> str:
    """What the probe step is, for the report's rows and captions."""
    return f"frozen embeddings + {PROBE_NAMES[probe.metrics['protocol']]}"
def _regional_section(runs: dict[int, tuple[StageResult, StageResult]], task: str) -> str:
    """The region's adapter without and with regional pretraining at every size, what it cost, and whether it
    helped."""
    key = "accuracy" if task == "classification" else "r2"
    lines = [f"| adapter | labels | test {key} without | with regional pretraining | change | adapter MB without | "
             f"with |", "|---|---:|---:|---:|---:|---:|---:|"]
    worse = []
    for size, (without, with_) in sorted(runs.items()):
        a, b = without.metrics["test"]["overall"][key], with_.metrics["test"]["overall"][key]
        worse += [size] if b < a else []
        lines.append(f"| {with_.metrics['method']} | {size} | {a:.4f} | {b:.4f} | {b - a:+.4f} | "
                     f"{without.metrics['adapter_bytes'] / 1e6:.3f} | {with_.metrics['adapter_bytes'] / 1e6:.3f} |")
    first = runs[min(runs)][1].metrics["regional_pretrain"]
    knn = first["feature_knn_val"]
    cost = (f"DINO on the region's {first['images']} train images, labels unused: {first['epochs']} epochs, "
            f"{first['steps']} steps, {first['seconds']:.0f} s, {first['trainable_parameters']} parameters trained "
            f"(the adapter's own + {first['trainable']}); trained once and reused at every size.")
    if knn["before"] is not None:
        cost += (f" kNN accuracy of the features on the val split (the {min(runs)} calibration samples as the bank): "
                 f"{knn['before']:.3f} before, {knn['after']:.3f} after.")
    verdict = (f"**Regional pretraining lowered the adapter's test {key} at {', '.join(map(str, worse))} labels**: with "
               f"these settings it does not help on this region." if worse else
               f"Regional pretraining did not lower the adapter's test {key} at any size.")
    return "\n".join([*lines, "", cost, "", verdict])
