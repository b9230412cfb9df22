"""``pretrain method=dino resume=``: the setup check and a resumed run ending where an uninterrupted one ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmtransfer.errors import ConfigError
from fmtransfer.lineage import load_record
from fmtransfer.tasks.pretrain import pretrain

# two epochs of three steps; batch 16 is DINO's smallest (method.dino.min_batch_size)
DINO = ["experiment=smoke", "method=dino", "loader.batch_size=16", "data.limit=160", "trainer.limit_train_batches=3",
        "trainer.max_epochs=2", "method.dino.crops.n_local=2"]
STOP_AFTER_1 = ["+callbacks.stop._target_=tests.helpers.StopAfterEpoch", "+callbacks.stop.epochs=1"]


def _checkpoint_state(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_a_stopped_dino_run_resumes_to_the_same_teacher(cfg_factory, tmp_path):
    full = pretrain(cfg_factory("pretrain", *DINO, run_dir=tmp_path / "full"))
    stopped = pretrain(cfg_factory("pretrain", *DINO, *STOP_AFTER_1, run_dir=tmp_path / "stopped"))
    assert stopped.metrics["epochs"] == 1
    state = _checkpoint_state(stopped.run_dir)  # what a resume needs besides the student and the optimiser
    assert "loss_fn.center" in state and any(k.startswith("teacher.backbone.") for k in state)
    assert any(k.startswith("teacher.head.") for k in state)

    resumed = pretrain(cfg_factory("pretrain", *DINO, f"resume={stopped.run_dir}", run_dir=tmp_path / "resumed"))
    assert resumed.metrics["global_step"] == full.metrics["global_step"] == 6
    assert [e["epoch"] for e in resumed.metrics["dino"]["epochs"]] == [1, 2]
    a, b = _checkpoint_state(full.run_dir), _checkpoint_state(resumed.run_dir)
    for key in [k for k in a if k.startswith("teacher.") or k == "loss_fn.center"]:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)  # bit-identical on CPU
    saved_a, saved_b = load_file(full.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    for key in saved_a:
        np.testing.assert_array_equal(saved_a[key].numpy(), saved_b[key].numpy(), err_msg=key)
    record = load_record(resumed.run_dir)
    assert record["resume_differs"] == [] and record["parents"][0]["run_dir"] == str(stopped.run_dir.resolve())


@pytest.mark.slow
def test_dino_resume_checks_the_setup(cfg_factory, tmp_path, caplog):
    stopped = pretrain(cfg_factory("pretrain", *DINO, *STOP_AFTER_1, run_dir=tmp_path / "stopped"))
    other = ["method.dino.teacher_temp=0.05"]
    with pytest.raises(ConfigError, match=r"set up differently: method.dino.teacher_temp=0.07 there, 0.05 here.*"
                                          r"resume_force=true"):
        pretrain(cfg_factory("pretrain", *DINO, *other, f"resume={stopped.run_dir}", run_dir=tmp_path / "other"))
    assert not (tmp_path / "other" / "checkpoints").exists()
    forced = pretrain(cfg_factory("pretrain", *DINO, *other, f"resume={stopped.run_dir}", "resume_force=true",
                                  run_dir=tmp_path / "forced"))
    assert load_record(forced.run_dir)["resume_differs"] == ["method.dino.teacher_temp"]
    assert "resuming anyway (resume_force=true)" in caplog.text
