"""DINO past one process: 2 CPU processes (gloo, ``trainer=ddp``) train like one process on the same global batch,
the collapse signals are global so every rank stops at the same step, and only rank 0 writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, cli_env, free_port
from tests.fixtures import pattern, save_image

# per-step loss of 2 processes against 1: float32 sums in another order (each process's half, then the
# all-reduce), nothing else; measured: 2e-7, 8e-8 and 2e-6 relative over 3 steps
RELATIVE_TOLERANCE = 1e-4
GLOBAL_BATCH = 32
COMMON = ["method=dino", "backbone=tiny_cnn", "data=image_folder", "data.channels=1", "data.image_size=[16,16]",
          "method.dino.prototypes=256", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
          "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "loader.num_workers=0"]


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    """200 unlabelled 16x16 images (no class folders: no kNN monitor, so the runs are short)."""
    root = tmp_path_factory.mktemp("ddp_flat")
    rng = np.random.default_rng(0)
    for i in range(200):
        save_image(pattern(i % 3, 16, rng, 1), root / f"{i:03d}.png")
    return root


def _pretrain(root: Path, out: Path, processes: int, extra: list[str] = (), timeout: int = 300):
    args = [*COMMON, f"data.source.root={root}", f"run_dir={out}", f"hydra.run.dir={out}", *extra]
    if processes == 1:
        cmd = [sys.executable, "-m", "fmtransfer", "pretrain", *args, "trainer=cpu",
               f"loader.batch_size={GLOBAL_BATCH}"]
    else:  # loader.batch_size is each process's
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "fmtransfer", "pretrain", *args, "trainer=ddp", "trainer.accelerator=cpu",
               f"trainer.devices={processes}",
               f"loader.batch_size={GLOBAL_BATCH // processes}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=timeout)


def _step_losses(run: Path) -> list[float]:
    with open(run / "logs" / "metrics.csv") as f:
        return [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


@pytest.mark.e2e
def test_two_processes_train_like_one_on_the_same_global_batch(flat, tmp_path):
    one = _pretrain(flat, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _pretrain(flat, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _step_losses(tmp_path / "one"), _step_losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert len(set(a)) == 3  # the weights, centre and teacher moved: later steps compare training, not init
    np.testing.assert_allclose(b, a, rtol=RELATIVE_TOLERANCE)
    # rank 0 alone wrote the run: one run.json (not rank 1's listing rank 0's as an earlier attempt), the model
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["status"] == "ok" and not record.get("previous_attempts")
    assert (tmp_path / "two" / "model.json").is_file()
    epochs = json.loads((tmp_path / "two" / "metrics.json").read_text())["dino"]["epochs"]
    ref = json.loads((tmp_path / "one" / "metrics.json").read_text())["dino"]["epochs"]
    for key in ("loss", "teacher_entropy", "teacher_mean_entropy", "embedding_std"):
        assert epochs[0][key] == pytest.approx(ref[0][key], rel=1e-3), key


@pytest.mark.e2e
def test_a_collapse_under_two_processes_stops_both_with_the_error(flat, tmp_path):
    """A forced uniform collapse: every rank sees the same (global) signals and raises at the same step, so the
    job ends with the error instead of one rank waiting for the other in the next all-reduce."""
    out = tmp_path / "collapse"
    proc = _pretrain(flat, out, 2, ["method.dino.teacher_temp_start=1000", "method.dino.teacher_temp=1000",
                                    "method.dino.collapse.patience=2"], timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count("DINO collapsed at epoch 1, step 2") == 2, proc.stderr[-3000:]  # one line per rank
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["collapsed"]["signal"] == "uniform"
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def _worker(rank: int, world: int, port: int, inputs: dict, results) -> None:
    """One gloo process: its half of the batch through the signals and the global BatchNorm."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fmtransfer.models.dino import DinoLoss, embedding_std
        from fmtransfer.models.sync_norm import GlobalBatchNorm

        half = slice(rank, None, world)
        loss_fn = DinoLoss(8, 0.1, 0.9)
        student = [s[half] for s in inputs["student"]]
        teacher = [t[half] for t in inputs["teacher"]]
        _, signals = loss_fn(student, teacher, 0.04)
        loss_fn.update_center(torch.cat(teacher))
        signals["embedding_std"] = embedding_std(inputs["features"][half])
        norm = GlobalBatchNorm(3).train()
        norm.load_state_dict(inputs["norm"])
        x = inputs["x"][half].clone().requires_grad_(True)
        (norm(x) * inputs["w"][half]).sum().backward()
        results[rank] = {"signals": signals, "center": loss_fn.center.clone(), "grad_x": x.grad,
                         "grad_weight": norm.weight.grad, "running_var": norm.running_var.clone()}
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.e2e
def test_signals_centre_and_batchnorm_are_those_of_the_global_batch():
    """Each rank holds a different half (rank 1's is the near-uniform one); both must get the one-process numbers."""
    from fmtransfer.models.dino import DinoLoss, embedding_std

    g = torch.Generator().manual_seed(0)
    n = 16
    teacher = [torch.randn(n, 8, generator=g) * torch.tensor([4.0, 0.01]).repeat(8)[:n, None] for _ in range(2)]
    inputs = {"student": [torch.randn(n, 8, generator=g) for _ in range(3)], "teacher": teacher,
              "features": torch.randn(n, 5, generator=g), "x": torch.randn(n, 3, 4, 4, generator=g) * 2 + 1,
              "w": torch.randn(n, 3, 4, 4, generator=g), "norm": torch.nn.BatchNorm2d(3).state_dict()}
    loss_fn = DinoLoss(8, 0.1, 0.9)
    _, expected = loss_fn(inputs["student"], teacher, 0.04)
    loss_fn.update_center(torch.cat(teacher))
    expected["embedding_std"] = embedding_std(inputs["features"])
    norm = torch.nn.BatchNorm2d(3).train()
    x = inputs["x"].clone().requires_grad_(True)
    (norm(x) * inputs["w"]).sum().backward()

    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, 2, port, inputs, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        got = dict(results)
    for rank in range(2):
        r = got[rank]
        for key, value in expected.items():
            assert r["signals"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (rank, key)
        torch.testing.assert_close(r["center"], loss_fn.center)
        torch.testing.assert_close(r["running_var"], norm.running_var)
        # the input gradient flows through the other rank's statistics too (the all-reduce's backward)
        torch.testing.assert_close(r["grad_x"], x.grad[rank::2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0]["grad_weight"] + got[1]["grad_weight"], norm.weight.grad, rtol=1e-4, atol=1e-5)
