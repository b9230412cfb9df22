"""``pipeline method=dino`` is refused before anything trains, with the stages that take a self-supervised model."""

from __future__ import annotations

import pytest

from fmtransfer.errors import ConfigError
from fmtransfer.tasks.pipeline import pipeline


def test_pipeline_refuses_dino_naming_the_stages_that_take_it(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline method=dino: .*has none; run fmtransfer pretrain method=dino, "
                                          r"then evaluate model=<run> protocol=knn"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "method=dino", "sweep.sizes=[20]", "region.limit=200"))
    assert not (tmp_path / "pipeline" / "pretrain").exists()


def test_pipeline_refuses_jepa_by_its_own_name(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline method=jepa: .*run fmtransfer pretrain method=jepa, then"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "method=jepa", "sweep.sizes=[20]", "region.limit=200"))
    assert not (tmp_path / "pipeline" / "pretrain").exists()
