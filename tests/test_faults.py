"""Fault injection: each case feeds one bad input through a real entry point and checks what the user sees.

One test function per fault; its docstring names the fault and what the user sees (README.md, "Reliability",
has the same table). Cases call the stage functions in-process (``evaluate(cfg)``, ``pretrain(cfg)``) with configs
composed as the CLI composes them, or the data layer where the stage only forwards to it. Images are tiny, so
every case runs in seconds; the trained model is shared by the module.
"""

from __future__ import annotations

import csv
import os
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fmtransfer.errors import DataError
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.pretrain import pretrain
from tests.conftest import make_cfg
from tests.fixtures import make_csv_manifest, make_image_folder, save_image

SMOKE = ["experiment=smoke", "data.limit=null", "data.image_size=[16,16]"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny RGB model (classes a, b, c; 16x16) that the evaluate cases score with."""
    base = tmp_path_factory.mktemp("faults")
    root = make_image_folder(base / "train", per_class=8, channels=3)
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before conftest's per-test cache isolation
        mp.setenv("FMTRANSFER_CACHE", str(base / "cache"))
        cfg = make_cfg("pretrain", [*SMOKE, "data=image_folder", f"data.source.root={root}"], base / "run")
        return pretrain(cfg).run_dir


def evaluate_folder(model: Path, root: Path, run_dir: Path, *overrides: str):
    """``fmtransfer evaluate`` of an image folder's train split, as the CLI would run it."""
    cfg = make_cfg("evaluate", [f"model={model}", "data=image_folder", f"data.source.root={root}",
                                "data.image_size=[16,16]", "split=train", "data.split.train=1.0",
                                "data.split.val=0.0", "data.split.test=0.0", "data.max_skipped_fraction=0.2",
                                *overrides], run_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(cfg)
    return result, [str(w.message) for w in caught]


def skipped_rows(run_dir: Path, recipe: str = "image_folder") -> dict[str, str]:
    """{path: reason} of the run's ``data/<recipe>.skipped.csv``."""
    path = run_dir / "data" / f"{recipe}.skipped.csv"
    assert path.is_file(), f"no {path.name}: nothing was skipped"
    with open(path, newline="") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


def pretrain_manifest(manifest: Path, run_dir: Path, *overrides: str):
    return pretrain(make_cfg("pretrain", [*SMOKE, "data=csv_manifest", f"data.source.path={manifest}",
                                          *overrides], run_dir))


def add_rows(manifest: Path, *rows: list[str]) -> None:
    with open(manifest, "a", newline="") as f:
        csv.writer(f).writerows(rows)


def _forbid_tiff_decoding(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("TIFF pixels were decoded")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", boom)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", boom)


def test_decompression_bomb_tiff(model, tmp_path, monkeypatch):
    """Fault: a 10240x10240 zlib TIFF (~100 KB on disk, 105 MB decoded; the reported 20000x20000 one took 11 GB).
    User sees: evaluate runs; the file is skipped before it is decoded, named in the warning and in
    data/<recipe>.skipped.csv with its size and the cap, data.max_pixels (default 8192x8192)."""
    root = make_image_folder(tmp_path / "imgs", per_class=8, channels=3)
    tile = np.zeros((1024, 1024), np.uint8)
    bomb = root / "a" / "bomb.tif"
    tifffile.imwrite(bomb, shape=(10240, 10240), dtype=np.uint8, tile=(1024, 1024), compression="zlib",
                     data=(tile for _ in range(100)))
    assert bomb.stat().st_size < 1_000_000
    _forbid_tiff_decoding(monkeypatch)
    result, warned = evaluate_folder(model, root, tmp_path / "ev")
    assert result.metrics["overall"]["n"] == 24
    reason = skipped_rows(tmp_path / "ev")[str(bomb)]
    assert "10240x10240" in reason and "104,857,600 pixels" in reason and "data.max_pixels=67108864" in reason
    assert any("bomb.tif" in w and "10240x10240" in w for w in warned)


def test_image_over_a_configured_pixel_cap(model, tmp_path):
    """Fault: a PNG larger than data.max_pixels (Pillow alone only warns up to ~179 MP).
    User sees: the PNG is skipped, listed with its size and the cap; the other images are scored."""
    root = make_image_folder(tmp_path / "imgs", per_class=8, channels=3)
    big = save_image(np.zeros((40, 50, 3), np.uint8), root / "b" / "big.png")
    result, _ = evaluate_folder(model, root, tmp_path / "ev", "data.max_pixels=1000")
    assert result.metrics["overall"]["n"] == 24
    reason = skipped_rows(tmp_path / "ev")[str(big)]
    assert "50x40" in reason and "2,000 pixels" in reason and "data.max_pixels=1000" in reason


def test_cmyk_tiff(tmp_path):
    """Fault: a CMYK TIFF (photometric=separated), which used to be read as RGBA (pure red came out cyan).
    User sees: red stays red, in training's loader and in the torch-free serving path alike."""
    from fmtransfer.data import RecipeDataModule, load_recipe
    from fmtransfer.export.predict import preprocess_image

    red = np.zeros((16, 16, 4), np.uint8)
    red[..., 1:3] = 255  # no cyan, full magenta and yellow, no black
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            tifffile.imwrite(tmp_path / "imgs" / cls / f"{i}.tif", red, photometric="separated")
    recipe = load_recipe({"name": "cmyk", "source": {"kind": "image_folder", "root": str(tmp_path / "imgs")},
                          "channels": 3, "image_size": 16, "mean": [0.0], "std": [1.0],
                          "split": {"train": 1.0, "val": 0.0, "test": 0.0}})
    x, _, _ = next(iter(RecipeDataModule(recipe, batch_size=8, num_workers=0).dataloader("train")))
    assert np.allclose(x[:, 0].numpy(), 1.0) and np.allclose(x[:, 1:].numpy(), 0.0)
    served = preprocess_image(tmp_path / "imgs" / "a" / "0.tif",
                              {"channels": 3, "image_size": [16, 16], "mean": [0.0], "std": [1.0]})
    assert np.allclose(served[0], 1.0) and np.allclose(served[1:], 0.0)


def test_float_tiff_outside_unit_range(model, tmp_path):
    """Fault: a float32 TIFF holding values 0..1000 (float images are used as they are, so this one would feed
    the model numbers 1000x too large). User sees: the file is skipped, its reason gives the value range and the
    rule (floats must lie in [0, 1]; integers are scaled by their type's range)."""
    root = make_image_folder(tmp_path / "imgs", per_class=8, channels=3)
    hot = root / "c" / "hot.tif"
    tifffile.imwrite(hot, np.linspace(0, 1000, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3), photometric="rgb")
    result, _ = evaluate_folder(model, root, tmp_path / "ev")
    assert result.metrics["overall"]["n"] == 24
    reason = skipped_rows(tmp_path / "ev")[str(hot)]
    assert "[0, 1000]" in reason and "outside [0, 1]" in reason


def test_manifest_lists_a_file_twice(tmp_path):
    """Fault: a CSV manifest that lists the same image twice (here once as ./images/...), which put the same
    sample in train and test. User sees: a DataError before training that names both rows."""
    manifest = make_csv_manifest(tmp_path)
    add_rows(manifest, ["./images/north_a_000.png", "a", "north"])
    with pytest.raises(DataError, match=r"1 file\(s\) are listed more than once.*line 2.*line 74"):
        pretrain_manifest(manifest, tmp_path / "run")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_manifest_gives_a_file_two_labels(tmp_path):
    """Fault: a CSV manifest that gives one image two labels. User sees: a DataError before training naming the
    file, both labels and their rows."""
    manifest = make_csv_manifest(tmp_path)
    add_rows(manifest, ["images/south_c_005.png", "a", "south"])
    with pytest.raises(DataError, match=r"carry more than one label.*south_c_005.png \('c'\) = .*south_c_005.png \('a'\)"):
        pretrain_manifest(manifest, tmp_path / "run")


def test_manifest_paths_outside_its_root(tmp_path):
    """Fault: manifest rows with an absolute path (/etc/hostname) and a ../ path leaving the manifest's folder.
    User sees: a DataError before anything is read, naming the rows and data.source.allow_outside_root=true."""
    manifest = make_csv_manifest(tmp_path / "data")
    save_image(np.zeros((16, 16, 3), np.uint8), tmp_path / "other" / "x.png")
    add_rows(manifest, ["/etc/hostname", "a", "north"], ["../other/x.png", "b", "north"])
    with pytest.raises(DataError) as e:
        pretrain_manifest(manifest, tmp_path / "run")
    msg = str(e.value)
    assert "2 path(s) lie outside" in msg and "/etc/hostname" in msg and "../other/x.png" in msg
    assert "data.source.allow_outside_root=true" in msg


def test_folder_symlink_leaving_the_root(model, tmp_path):
    """Fault: an image folder holding a symlink to a file outside it. User sees: a DataError naming the link and
    its target (data.source.allow_outside_root=true reads it)."""
    root = make_image_folder(tmp_path / "imgs", per_class=8, channels=3)
    outside = save_image(np.zeros((16, 16, 3), np.uint8), tmp_path / "private" / "p.png")
    os.symlink(outside, root / "a" / "p.png")
    with pytest.raises(DataError, match=r"a/p.png is a symlink to .*private/p.png.*allow_outside_root=true"):
        evaluate_folder(model, root, tmp_path / "ev")
    result, _ = evaluate_folder(model, root, tmp_path / "ev2", "data.source.allow_outside_root=true")
    assert result.metrics["overall"]["n"] == 25


def test_symlink_loops(model, tmp_path):
    """Fault: symlink loops in an image folder (two links naming each other, a folder linking to its parent).
    User sees: the run neither hangs nor crashes; each loop is listed in data/<recipe>.skipped.csv."""
    root = make_image_folder(tmp_path / "imgs", per_class=8, channels=3)
    os.symlink("y.png", root / "a" / "x.png")
    os.symlink("x.png", root / "a" / "y.png")
    os.symlink("..", root / "b" / "parent")
    result, _ = evaluate_folder(model, root, tmp_path / "ev")
    assert result.metrics["overall"]["n"] == 24
    rows = skipped_rows(tmp_path / "ev")
    assert set(rows) == {str(root / "a" / "x.png"), str(root / "a" / "y.png"), str(root / "b" / "parent")}
    assert all("symlink loop" in reason for reason in rows.values())


@pytest.mark.parametrize("how", ["replace", "rewrite"])
def test_image_replaced_with_same_size_and_mtime(tmp_path, how):
    """Fault: an image replaced by another of the same size whose mtime is set back (os.utime), which the scan
    cache used to miss, keeping the old hash. User sees: the new content is hashed (the data fingerprint changes).
    Data layer: every stage reads files through this scan."""
    from fmtransfer.data import build_table, load_recipe
    from fmtransfer.data.images import scan_images
    from fmtransfer.lineage.io import sha256_file

    root = make_image_folder(tmp_path / "imgs", per_class=4, suffix=".bmp")  # BMPs of one size: same bytes count
    target, other = root / "a" / "000.bmp", root / "b" / "001.bmp"
    recipe = load_recipe({"name": "f", "source": {"kind": "image_folder", "root": str(root)}, "channels": 1,
                          "image_size": 16})
    cache = tmp_path / "cache"
    first = build_table(recipe, cache_dir=cache)
    before = os.stat(target)
    replacement = other.read_bytes()
    assert len(replacement) == before.st_size and replacement != target.read_bytes()
    time.sleep(0.05)  # past the file system's timestamp granularity
    if how == "replace":
        (tmp_path / "b.tmp").write_bytes(replacement)
        os.replace(tmp_path / "b.tmp", target)
    else:
        with open(target, "r+b") as f:
            f.write(replacement)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = build_table(recipe, cache_dir=cache)
    assert second.fingerprint != first.fingerprint
    paths = list(first.paths)
    assert scan_images(paths, 1, cache_dir=cache).sha256[paths.index(target)] == sha256_file(target)


def test_large_file_is_hashed_in_chunks(tmp_path):
    """Fault: a large image file, which used to be read whole into memory to hash it. User sees: scanning holds
    a bounded amount of it (a PNG followed by 32 MB its decoder ignores). Data layer: the scan every stage runs."""
    from fmtransfer.data.images import scan_images
    from fmtransfer.lineage.io import sha256_file

    path = save_image(np.zeros((8, 8, 1), np.uint8), tmp_path / "x.png")
    with open(path, "ab") as f:
        f.write(b"\0" * (32 << 20))
    tracemalloc.start()
    try:
        scan = scan_images([path], 1, workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scan.ok[0] and scan.sha256[0] == sha256_file(path)
    assert peak < 8 << 20, f"scanning held {peak / 2**20:.1f} MiB"


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _layout(monkeypatch, **env: str) -> None:
    """Exactly ``env`` of the variables launchers set (none of the test runner's own)."""
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def curate_folder(model: Path, root: Path, run_dir: Path, *overrides: str):
    """``fmtransfer curate`` of an image folder's train split with the shared model as base."""
    from fmtransfer.tasks.curate import curate

    return curate(make_cfg("curate", [f"base={model}", "data=image_folder", f"data.source.root={root}",
                                      "data.image_size=[16,16]", "data.split.train=1.0", "data.split.val=0.0",
                                      "data.split.test=0.0", "curation.levels=[4,2]", "curation.target_size=0.5",
                                      *overrides], run_dir))


@pytest.mark.parametrize("env", [
    {"RANK": "1", "WORLD_SIZE": "2"},   # used to embed shard 1 and stop: a silent no-op
    {"RANK": "0", "WORLD_SIZE": "2"},   # used to wait 24 h for shards nobody writes
    {"WORLD_SIZE": "2"},                # the same, as rank 0 by default
    {"RANK": "2", "WORLD_SIZE": "2"},
    {"RANK": "-1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"},
    {"RANK": "one", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"},
], ids=lambda env: " ".join(f"{k}={v}" for k, v in env.items()))
def test_stray_rank_layout_in_curate(model, tmp_path, monkeypatch, env):
    """Fault: RANK / WORLD_SIZE left in the shell (no launcher started the process), or a layout that cannot
    complete. User sees: curate refuses at once with a ConfigError naming the variables and how to unset them or
    launch with torchrun, and embeds nothing (it used to stop after one rank's shards, or wait a day for shards)."""
    from fmtransfer.errors import ConfigError

    root = make_image_folder(tmp_path / "imgs", per_class=8, channels=3)
    _layout(monkeypatch, **env)
    with pytest.raises(ConfigError, match=r"from the environment|in the environment") as e:
        curate_folder(model, root, tmp_path / "cur", "curation.embed.shard_size=8", "curation.embed.wait_s=1")
    assert "unset RANK WORLD_SIZE LOCAL_RANK" in str(e.value) and "torchrun" in str(e.value)
    assert not (tmp_path / "cur" / "embeddings").exists()


def test_rank_0_waits_for_shards_nobody_writes(model, tmp_path, monkeypatch, caplog):
    """Fault: a launched rank 0 (RANK=0 WORLD_SIZE=2 MASTER_ADDR=...) whose rank 1 never runs. User sees: a warning
    that the environment split the work, progress lines naming the shards present and missing, then (after
    curation.embed.wait_s without a new shard; 3600 s by default, it was 24 h) a DataError naming the missing
    shards, their rank, the key and the environment's layout."""
    import logging

    from fmtransfer.errors import DataError

    root = make_image_folder(tmp_path / "imgs", per_class=8, channels=3)  # 24 images: shards 0-2 of 8
    _layout(monkeypatch, RANK="0", WORLD_SIZE="2", MASTER_ADDR="localhost")
    caplog.set_level(logging.INFO)
    with pytest.raises(DataError) as e:
        curate_folder(model, root, tmp_path / "cur", "curation.embed.shard_size=8", "curation.embed.wait_s=0.5")
    message = str(e.value)
    assert "1 of 3 shards [1] were not written by rank(s) [1] within 0.5 s (curation.embed.wait_s)" in message
    assert "RANK=0 WORLD_SIZE=2 MASTER_ADDR=localhost from the environment" in message
    logged = [r.getMessage() for r in caplog.records]
    assert any(r.levelno == logging.WARNING and "RANK=0 WORLD_SIZE=2" in r.getMessage()
               and "embeds shard 0 of every 2" in r.getMessage() for r in caplog.records), logged
    assert any("2 of 3 shards present; waiting for [1] from rank(s) [1]" in m for m in logged), logged
    assert make_cfg("curate", [], tmp_path / "d").curation.embed.wait_s == 3600


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"RANK": "1", "WORLD_SIZE": "2"}, {"LOCAL_RANK": "1"}],
                         ids=lambda env: " ".join(f"{k}={v}" for k, v in env.items()))
def test_stray_rank_in_pretrain(tmp_path, monkeypatch, env):
    """Fault: a stray RANK (or LOCAL_RANK) in the shell when pretraining, under which Lightning trained as a
    non-zero rank and silently wrote no metrics, model or logs. User sees: a ConfigError before any training,
    naming the variables (the CLI prints it as one line, exit 2)."""
    from fmtransfer.errors import ConfigError

    root = make_image_folder(tmp_path / "train", per_class=4, channels=3)
    _layout(monkeypatch, **env)
    with pytest.raises(ConfigError, match=next(iter(env))):
        pretrain(make_cfg("pretrain", [*SMOKE, "data=image_folder", f"data.source.root={root}"], tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name, content", [
    ("model.onnx", b"\x08\x07\x12\x07pytorch\x1a\x052.5.1:\x9a\xff\x80"),  # an ONNX protobuf's first bytes
    ("photo.png", None),
    ("list.json", b"[1, 2]"),
])
def test_non_model_file_as_model(model, tmp_path, name, content):
    """Fault: model=<an ONNX file, an image, any non-model file>, which used to end in a UnicodeDecodeError (or
    AttributeError) traceback. User sees: an ArtifactError naming the file (the CLI prints one line, exit 2); for
    an ONNX file it points at `fmtransfer predict`."""
    from fmtransfer.errors import ArtifactError

    path = tmp_path / name
    if content is None:
        save_image(np.full((8, 8, 3), 200, np.uint8), path)
    else:
        path.write_bytes(content)
    root = make_image_folder(tmp_path / "imgs", per_class=2, channels=3)
    with pytest.raises(ArtifactError, match=str(path)) as e:
        evaluate_folder(path, root, tmp_path / "ev")
    if name.endswith(".onnx"):
        assert "is an ONNX file" in str(e.value) and f"fmtransfer predict model={path}" in str(e.value)
    assert "\n" not in str(e.value)


class _Payload:
    """Pickles as a call to Path.touch(marker): what a weights-only load must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_malicious_checkpoint_as_resume(tmp_path):
    """Fault: resume=<run dir> whose checkpoints/last.ckpt is a pickle with a __reduce__ payload. User sees: a
    one-line ArtifactError naming the file as not a safe checkpoint (it was refused, but with a traceback), and
    the payload never runs."""
    import torch

    from fmtransfer.errors import ArtifactError

    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "old" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "x": _Payload(marker)}, ckpt)
    root = make_image_folder(tmp_path / "train", per_class=4, channels=3)
    with pytest.raises(ArtifactError, match=f"{ckpt} is not a safe checkpoint") as e:
        pretrain(make_cfg("pretrain", [*SMOKE, "data=image_folder", f"data.source.root={root}",
                                       f"resume={tmp_path / 'old'}"], tmp_path / "run"))
    assert "\n" not in str(e.value) and not marker.exists()


@pytest.mark.e2e
def test_onnx_model_on_the_command_line(tmp_path):
    """Fault: `fmtransfer evaluate model=<file.onnx>` typed by a user. User sees: one line on stderr naming the file
    and `fmtransfer predict`, exit status 2, no traceback."""
    import subprocess
    import sys

    from tests.conftest import ROOT, cli_env

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch\x9a\xff\x80")
    proc = subprocess.run([sys.executable, "-m", "fmtransfer", "evaluate", f"model={onnx}",
                           f"hydra.run.dir={tmp_path / 'ev'}"], capture_output=True, text=True, env=cli_env(),
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"fmtransfer evaluate: error: model={onnx} is an ONNX file" in proc.stderr


def test_stray_rank_in_adapt(base, tmp_path, monkeypatch):
    """Fault: a stray RANK in the shell when fitting an adapter, under which Lightning trained as rank 1 and saved
    nothing. User sees: a ConfigError before any training, naming the variable (one line, exit 2)."""
    from fmtransfer.errors import ConfigError
    from fmtransfer.tasks.adapt import adapt

    _layout(monkeypatch, RANK="1")
    with pytest.raises(ConfigError, match="RANK"):
        adapt(make_cfg("adapt", [f"base={base}", "data=uci_digits_region", "calibration.size=20", "trainer=debug"],
                       tmp_path / "run"))
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
