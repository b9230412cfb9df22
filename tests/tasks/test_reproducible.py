"""Same config and seed, same numbers: an adapter repeated in one process, or after another stage, is bit for bit
the same; the ``deterministic`` switch reaches every training stage's Trainer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fmtransfer.errors import ConfigError
from fmtransfer.tasks.adapt import adapt
from fmtransfer.tasks.common import build_trainer
from fmtransfer.tasks.pretrain import pretrain
from tests.conftest import make_cfg

ADAPT = ["data=uci_digits_region", "data.limit=300", "adapter.steps=6", "calibration.size=30", "logger=none"]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The adapter every test compares with: the first adapt of this process."""
    return _adapt(base, tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture
def deterministic_flag_restored():
    yield
    torch.use_deterministic_algorithms(False)


def _adapt(base, folder):
    result = adapt(make_cfg("adapt", [f"base={base}", *ADAPT], folder))
    return result, load_file(result.outputs["adapter"])


def _assert_same(first, second) -> None:
    (a, tensors_a), (b, tensors_b) = first, second
    assert a.metrics["test"] == b.metrics["test"] and a.metrics["val"] == b.metrics["val"]
    assert sorted(tensors_a) == sorted(tensors_b)
    differ = [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])]
    assert differ == [], f"{len(differ)} of {len(tensors_a)} adapter tensors differ, e.g. {differ[:3]}"
    # per-image confidences, to the last digit written
    assert (a.run_dir / "predictions_test.csv").read_bytes() == (b.run_dir / "predictions_test.csv").read_bytes()


@pytest.mark.slow
def test_adapt_twice_in_one_process_gives_the_same_adapter(base, reference, tmp_path):
    _assert_same(reference, _adapt(base, tmp_path / "again"))


@pytest.mark.slow
def test_adapt_after_another_stage_gives_the_same_adapter(base, reference, tmp_path, deterministic_flag_restored):
    # another stage draws random numbers (its own initialisation) and sets torch's process-wide flags
    pretrain(make_cfg("pretrain", ["experiment=smoke", "logger=none", "seed=7", "deterministic=true"],
                      tmp_path / "other"))
    _assert_same(reference, _adapt(base, tmp_path / "after"))
    assert not torch.are_deterministic_algorithms_enabled()  # adapt's deterministic=false, not the earlier stage's


def test_deterministic_switch_sets_torch_for_each_trainer(tmp_path, deterministic_flag_restored):
    def trainer(*overrides: str):
        cfg = make_cfg("pretrain", ["experiment=smoke", *overrides], tmp_path / "run")
        return build_trainer(cfg, callbacks=[], logger=False, default_root_dir=tmp_path / "run")

    trainer("deterministic=true")
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    trainer()  # the default, false, resets what the previous stage set
    assert not torch.are_deterministic_algorithms_enabled()
    trainer("deterministic=warn")
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    trainer("deterministic=false", "+trainer.deterministic=true")  # Lightning's own key, set by the user, wins
    assert torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ConfigError, match="deterministic='sometimes'; expected true, false or warn"):
        trainer("deterministic=sometimes")


def test_several_processes_without_a_launcher_are_refused(tmp_path, monkeypatch):
    """Lightning's own relaunch cannot re-run `fmtransfer <stage>`: the second process died and the first was
    killed. The user is told to start the processes with torchrun instead."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    cfg = make_cfg("pretrain", ["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
                   tmp_path / "run")
    with pytest.raises(ConfigError, match=r"trainer.devices=2 .* asks for 2 processes: start them with a launcher, "
                                          r"e.g. `torchrun --nproc-per-node=2 -m fmtransfer pretrain \.\.\.`"):
        build_trainer(cfg, callbacks=[], logger=False, default_root_dir=tmp_path / "run")
    one = make_cfg("pretrain", ["experiment=smoke", "trainer.devices=1"], tmp_path / "one")
    assert build_trainer(one, callbacks=[], logger=False, default_root_dir=tmp_path / "one").world_size == 1
