"""curate end to end on a tiny base: manifest, report, data.subset, resumable embeddings, bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from fmtransfer.data import RecipeDataModule, load_recipe
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.lineage import load_record, verify_record
from fmtransfer.tasks.curate import curate
from fmtransfer.tasks.pretrain import pretrain
from fmtransfer.tasks.result import StageResult
from tests.conftest import ROOT, cli_env, make_cfg

SMALL = ["data.limit=300", "curation.levels=[12,4]", "curation.resampling_steps=2", "curation.target_size=0.3"]


def _manifest(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def curated(base, tmp_path_factory) -> StageResult:
    """One curate run on the shared base, read (never changed) by the tests below."""
    return curate(make_cfg("curate", [f"base={base}", *SMALL], tmp_path_factory.mktemp("curated") / "run"))


def test_curate_writes_a_manifest_that_recipes_consume(curated, tmp_path):
    out, m = curated.run_dir, curated.metrics
    rows = _manifest(curated.outputs["manifest"])
    assert m["pool"] == 240 and m["selected"] == len(rows) == 72  # the train split of 300, 30% kept
    assert list(rows[0]) == ["id", "path", "label", "region", "cluster_0", "cluster_1"]
    with open(out / "data" / "mnist_global.splits.csv") as f:
        split_of = {r["id"]: r["split"] for r in csv.DictReader(f)}
    assert {split_of[r["id"]] for r in rows} == {"train"} and len({r["id"] for r in rows}) == 72
    for name in ("cluster_sizes.png", "pca.png", "curation.md", "duplicates.csv", "embeddings/embeddings.npy"):
        assert (out / name).is_file(), name
    x = np.load(out / "embeddings" / "embeddings.npy", mmap_mode="r")
    assert x.shape == (240, 96) and np.isfinite(x).all()
    assert load_record(out)["parents"][0]["stage"] == "pretrain" and verify_record(out) == []
    checks = m["self_checks"]  # classes and top-level clusters (mnist_global has one region)
    assert set(checks["by"]) == {"class", "cluster"} and m["dedup_threshold"] == 0.99
    classes = checks["by"]["class"]["groups"]
    assert sum(g["pool"] for g in classes.values()) == 240 and sum(g["curated"] for g in classes.values()) == 72
    assert checks["dedup_share"] == m["duplicates_removed"] / 240
    assert "| class | pool | dedup removed | curated |" in (out / "curation.md").read_text()

    # the manifest as data.subset: the train split shrinks, val and test and the split assignment stay
    recipe = load_recipe(make_cfg("pretrain", ["experiment=smoke", f"data.subset={curated.outputs['manifest']}"],
                                  tmp_path / "x").data)
    sizes = RecipeDataModule(recipe).split_sizes()
    assert sizes == {"train": 72, "val": 30, "test": 30}
    pre = pretrain(make_cfg("pretrain", ["experiment=smoke", f"data.subset={curated.outputs['manifest']}"],
                            tmp_path / "pre"))
    assert pre.metrics["data"]["splits"]["train"] == 72


@pytest.mark.slow
def test_embeddings_resume_and_float16(base, tmp_path, monkeypatch):
    first = curate(make_cfg("curate", [f"base={base}", *SMALL, "curation.embed.shard_size=64",
                                       "curation.embed.dtype=float16"], tmp_path / "a"))
    progress = json.loads((tmp_path / "a" / "embeddings" / "embeddings.shards.json").read_text())
    assert progress["done"] == [0, 1, 2, 3] and np.load(tmp_path / "a" / "embeddings" / "embeddings.npy").dtype == np.float16
    import fmtransfer.models.inference as inference

    def boom(*a, **k):
        raise AssertionError("a finished shard was embedded again")

    monkeypatch.setattr(inference, "embed", boom)
    again = curate(make_cfg("curate", [f"base={base}", *SMALL, "curation.embed.shard_size=64",
                                       "curation.embed.dtype=float16", f"resume={tmp_path / 'a'}"], tmp_path / "b"))
    assert _manifest(again.outputs["manifest"]) == _manifest(first.outputs["manifest"])


@pytest.mark.slow
def test_ranks_embed_their_own_shards_and_rank_0_assembles(base, tmp_path, monkeypatch):
    args = [f"base={base}", *SMALL, "curation.embed.shard_size=64"]  # 240 rows: shards 0-3
    single = curate(make_cfg("curate", args, tmp_path / "one"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "localhost")  # as a launcher sets it; without one the layout is refused
    assert curate(make_cfg("curate", args, tmp_path / "two")) == StageResult("curate", tmp_path / "two",
                                                                             {"rank": 1, "embedded": True})
    (shard_dir,) = (tmp_path / "two" / "embeddings").glob("shards-*")
    assert sorted(p.name for p in shard_dir.iterdir()) == ["shard_00001.npy", "shard_00003.npy"]
    assert not (tmp_path / "two" / "curated.csv").exists() and not (tmp_path / "two" / "run.json").exists()
    monkeypatch.setenv("RANK", "0")
    two = curate(make_cfg("curate", args, tmp_path / "two"))
    assert not shard_dir.exists()  # assembled into embeddings.npy, then removed
    a, b = (np.load(tmp_path / d / "embeddings" / "embeddings.npy") for d in ("one", "two"))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert _manifest(two.outputs["manifest"]) == _manifest(single.outputs["manifest"])


@pytest.mark.slow
def test_rank_0_names_the_shards_it_waited_for(base, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost")  # as a launcher sets it; without one the layout is refused
    with pytest.raises(DataError, match=r"2 of 4 shards .* by rank\(s\) \[1, 2\] within 0.2 s"):
        curate(make_cfg("curate", [f"base={base}", *SMALL, "curation.embed.shard_size=64",
                                   "curation.embed.wait_s=0.2"], tmp_path / "a"))


def test_a_rank_outside_the_world_is_refused(base, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_ADDR", "localhost")  # launched, so only the rank itself is wrong
    with pytest.raises(ConfigError, match="RANK=3 with WORLD_SIZE=3"):
        curate(make_cfg("curate", [f"base={base}", *SMALL], tmp_path / "b"))


@pytest.mark.e2e
def test_torchrun_processes_share_the_embedding(base, tmp_path):
    """Two real processes started by torchrun: each embeds its own shards, rank 0 curates."""
    out = tmp_path / "tr"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "fmtransfer", "curate", f"base={base}", *SMALL, "curation.embed.shard_size=64", f"run_dir={out}",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_manifest(out / "curated.csv")) == 72
    assert json.loads((out / "embeddings" / "embeddings.shards.json").read_text())["world_size"] == 2


def test_precomputed_embeddings_give_the_same_manifest(curated, tmp_path):
    npy = curated.run_dir / "embeddings" / "embeddings.npy"
    again = curate(make_cfg("curate", [f"curation.embeddings={npy}", *SMALL], tmp_path / "b"))
    assert _manifest(again.outputs["manifest"]) == _manifest(curated.outputs["manifest"])


def test_bad_precomputed_embeddings_and_settings_are_refused(curated, tmp_path):
    npy = curated.run_dir / "embeddings" / "embeddings.npy"
    ids = (curated.run_dir / "embeddings" / "embeddings.ids.txt").read_text().splitlines()
    bad = tmp_path / "bad.npy"
    np.save(bad, np.load(npy)[:-1])
    (tmp_path / "bad.ids.txt").write_text("\n".join(ids) + "\n")
    with pytest.raises(DataError, match="239 rows but .* lists 240 ids"):
        curate(make_cfg("curate", [f"curation.embeddings={bad}", *SMALL], tmp_path / "c"))
    nan = np.load(npy).copy()
    nan[5, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "nan.ids.txt").write_text("\n".join(ids) + "\n")
    with pytest.raises(DataError, match="row 5 holds NaN"):
        curate(make_cfg("curate", ["curation.embeddings=" + str(tmp_path / "nan.npy"), *SMALL], tmp_path / "d"))
    with pytest.raises(DataError, match="asks for 500 samples, but the pool holds 240"):
        curate(make_cfg("curate", [f"curation.embeddings={npy}", *SMALL, "curation.target_size=500"], tmp_path / "e"))
    with pytest.raises(DataError, match="k=500 is larger than the 240 points"):
        curate(make_cfg("curate", [f"curation.embeddings={npy}", *SMALL, "curation.levels=[500,4]"], tmp_path / "f"))
    with pytest.raises(ConfigError, match="curation.levels"):
        curate(make_cfg("curate", [f"curation.embeddings={npy}", *SMALL, "curation.levels=[4,12]"], tmp_path / "g"))
    with pytest.raises(ConfigError, match="pass base="):
        curate(make_cfg("curate", SMALL, tmp_path / "h"))


@pytest.mark.slow
def test_stratified_by_label_keeps_every_class(base, tmp_path):
    m = curate(make_cfg("curate", [f"base={base}", *SMALL, "curation.stratify_by=label",
                                   "curation.target_size=20"], tmp_path / "s")).metrics
    assert m["selected"] == 20 and all(v["curated"] >= 1 for v in m["per_class"].values())


def test_subset_naming_unknown_ids_or_missing_files(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nnot-an-id,\n")
    recipe = load_recipe(make_cfg("pretrain", ["experiment=smoke", f"data.subset={manifest}"], tmp_path / "x").data)
    with pytest.raises(DataError, match="1 id\\(s\\) are not in recipe 'mnist_global'"):
        RecipeDataModule(recipe).prepare()
    manifest.write_text("id,path\nx,/no/such/file.png\n")
    with pytest.raises(DataError, match="names 1 file\\(s\\) that do not exist"):
        RecipeDataModule(recipe).prepare()


def test_label_strata_are_named_by_class():
    """stratify_by=label splits by the class's name, so that a short stratum is reported as 'sneaker', not '7'."""
    from types import SimpleNamespace

    from fmtransfer.curation.curate import CurationSettings
    from fmtransfer.tasks.curate import _strata

    table = SimpleNamespace(unlabelled=False, classes=["t-shirt", "trouser", "sneaker"],
                            targets=np.array([2, 0, 1, 2]), regions=np.array(["a", "a", "b", "b"]))
    rows = np.array([0, 2, 3])
    assert _strata(CurationSettings(stratify_by="label"), table, rows).tolist() == ["sneaker", "trouser", "sneaker"]
    assert _strata(CurationSettings(stratify_by="region"), table, rows).tolist() == ["a", "b", "b"]
    assert _strata(CurationSettings(), table, rows) is None
