"""curate on an unlabelled pool (images without class folders, a CSV without a label column), and DINO pretraining
on its curated manifest: the path that feeds self-supervised pretraining from data nobody labelled."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fmtransfer.errors import ConfigError
from fmtransfer.tasks.curate import curate
from fmtransfer.tasks.pretrain import pretrain
from tests.fixtures import pattern, save_image

SMALL = ["curation.levels=[6,2]", "curation.resampling_steps=1", "curation.target_size=0.5"]


def _flat_folder(root: Path, n: int = 80, size: int = 16) -> list[str]:
    """Images directly in ``root`` (no class folders: no labels); returns their names."""
    rng = np.random.default_rng(0)
    names = [f"{i:03d}.png" for i in range(n)]
    for i, name in enumerate(names):
        save_image(pattern(i % 4, size, rng, 1), root / name)
    return names


def _folder_data(root: Path) -> list[str]:
    return ["data=image_folder", f"data.source.root={root}", "data.channels=1", "data.image_size=[16,16]"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_curate_an_unlabelled_folder_then_dino_on_its_manifest(base, cfg_factory, tmp_path):
    root = tmp_path / "pool"
    _flat_folder(root)
    data = _folder_data(root)
    result = curate(cfg_factory("curate", f"base={base}", *data, *SMALL, run_dir=tmp_path / "curate"))
    m = result.metrics
    assert m["labelled"] is False and m["per_class"] is None
    assert m["pool"] == 56 and m["selected"] == len(_rows(result.outputs["manifest"])) == 28
    rows = _rows(result.outputs["manifest"])
    assert {r["label"] for r in rows} == {""}  # no labels: nothing made up
    report = (result.run_dir / "curation.md").read_text()
    assert "no labels" in report and "| class |" not in report
    assert json.loads((result.run_dir / "metrics.json").read_text())["labelled"] is False

    pre = pretrain(cfg_factory("pretrain", "experiment=smoke", "method=dino", "loader.batch_size=16",
                               "method.dino.crops.n_local=2", *data, f"data.subset={result.outputs['manifest']}",
                               run_dir=tmp_path / "dino"))
    assert pre.metrics["data"]["splits"]["train"] == 28 and pre.metrics["data"]["labelled"] is False
    assert len(pre.metrics["dino"]["epochs"]) == 1


@pytest.mark.slow
def test_curate_a_csv_without_labels(base, cfg_factory, tmp_path):
    names = _flat_folder(tmp_path / "images", n=40)
    manifest = tmp_path / "pool.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["path"], *[[f"images/{n}"] for n in names]])
    data = ["data=csv_manifest", f"data.source.path={manifest}", "data.channels=1", "data.image_size=[16,16]",
            "data.limit=null"]
    result = curate(cfg_factory("curate", f"base={base}", *data, *SMALL, run_dir=tmp_path / "curate"))
    assert result.metrics["labelled"] is False and result.metrics["selected"] > 0


def test_curate_stratified_by_label_refuses_an_unlabelled_pool(cfg_factory, tmp_path):
    root = tmp_path / "pool"
    _flat_folder(root, n=8)
    cfg = cfg_factory("curate", f"base={tmp_path}/no_model", *_folder_data(root), *SMALL,
                      "curation.stratify_by=label")
    with pytest.raises(ConfigError, match=r"curation.stratify_by=label.*has no labels.*holds images but no class "
                                          r"folders.*stratify_by=null"):
        curate(cfg)
