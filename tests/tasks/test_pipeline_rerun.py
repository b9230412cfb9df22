"""Rerun only what changed: the same pipeline again reuses every step; a new calibration size runs only the steps
that read it; `rerun=` names a step to run anyway."""

from __future__ import annotations

import time

import pytest

from fmtransfer.errors import ConfigError
from fmtransfer.tasks.pipeline import pipeline

SMALL = ["experiment=smoke", "region.limit=200", "sweep.sizes=[20]", "sweep.adapters=[lora]", "calibration.size=20",
         'adapt_overrides=["adapter.steps=2"]', "curate_global=false", "pretrain_curated=false",
         "export_region_model=false"]


def _run(cfg_factory, tmp_path, name, *extra):
    start = time.perf_counter()
    result = pipeline(cfg_factory("pipeline", *SMALL, *extra, run_dir=tmp_path / name))
    return result, time.perf_counter() - start


@pytest.mark.slow
def test_a_rerun_reuses_what_did_not_change(cfg_factory, tmp_path):
    first, t_first = _run(cfg_factory, tmp_path, "first")
    steps = set(first.steps) - {"adapt"}  # "adapt" names the region's own adapt step among them
    assert {"pretrain", "zero_shot", "monitor", "plan"} <= steps and len(steps) == 5
    again, t_again = _run(cfg_factory, tmp_path, "again")  # another run dir, nothing else changed
    report = (tmp_path / "again" / "report.md").read_text()
    assert f"reused, nothing they read changed ({len(steps)} of {len(steps)} steps" in report
    for name in steps:
        assert (tmp_path / "again" / name).is_symlink(), name
        assert again.steps[name].metrics == first.steps[name].metrics
    assert t_again < t_first / 2, (t_again, t_first)
    # a new calibration size: its adapt run and the plan run, the global steps and the other adapt run do not
    changed, _ = _run(cfg_factory, tmp_path, "changed", "calibration.size=30")
    ran = {n for n in set(changed.steps) - {"adapt"} if not (tmp_path / "changed" / n).is_symlink()}
    new_adapt = [n for n in set(changed.steps) - {"adapt"} if n.startswith("adapt") and n not in steps]
    assert len(new_adapt) == 1 and ran == {new_adapt[0], "plan"}, ran
    # rerun=[pretrain] runs it again (in this run dir, never into the earlier one) whatever its key
    forced, _ = _run(cfg_factory, tmp_path, "forced", "rerun=[pretrain]")
    assert not (tmp_path / "forced" / "pretrain").is_symlink()
    assert forced.steps["pretrain"].run_dir == tmp_path / "forced" / "pretrain"


def test_rerun_names_a_step(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"rerun=\['pretrian'\]: no step named pretrian; the steps are: pretrain"):
        pipeline(cfg_factory("pipeline", *SMALL, "rerun=[pretrian]", run_dir=tmp_path / "p"))
