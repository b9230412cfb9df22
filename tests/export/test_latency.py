"""Export latency: variants take turns in rounds, every ONNX variant runs on a session set up alike, and
onnxruntime's threads stop spinning when a timed run returns."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fmtransfer.export import latency
from fmtransfer.export.onnx_export import INPUT_NAME, export_onnx
from fmtransfer.export.runtime import create_session


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    path = tmp_path_factory.mktemp("lat") / "model.onnx"
    export_onnx(model, torch.randn(2, 1, 8, 8), path, task="classification")
    return model, path


def test_variants_take_turns_in_rotating_rounds_each_block_after_its_warmup():
    calls = []
    runners = {name: (lambda x, n=name: calls.append(n)) for name in ("a", "b")}
    times = latency.time_rounds(runners, np.zeros(1), repeats=7, warmup=2, rounds=3)
    assert [len(block) for block in times["a"]] == [len(block) for block in times["b"]] == [3, 2, 2]
    # a block is warm-up + share; the order rotates, so neither variant always follows the other
    assert calls == ["a"] * 5 + ["b"] * 5 + ["b"] * 4 + ["a"] * 4 + ["a"] * 4 + ["b"] * 4


def test_round_ratios_compare_variants_within_each_round():
    times = {"fp32": [[10.0, 12.0], [40.0, 40.0]], "int8": [[5.0, 6.0], [20.0, 20.0]]}
    assert latency.round_ratios(times, "fp32", "int8") == [2.0, 2.0]  # the slow second round cancels out
    assert latency.median_ms(times["fp32"]) == 26.0  # over all calls, whatever their round


def test_timing_sessions_share_their_options_and_stop_spinning_after_a_run(cnn):
    _, path = cnn
    session = latency.timing_session(path, 1)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    x = np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {INPUT_NAME: x})[0],
                               create_session(path).run(None, {INPUT_NAME: x})[0], atol=1e-6)


class _Threads(torch.nn.Module):
    """Records how many intra-op threads PyTorch had when it was called."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, set()

    def forward(self, x):
        self.seen.add(torch.get_num_threads())
        return self.inner(x)


def test_measure_latency_times_every_variant_and_batch_size_with_the_same_threads(cnn, monkeypatch):
    model, path = cnn
    plan = SimpleNamespace(batch_sizes=[1, 3], repeats=4, warmup=1, rounds=2)
    threads = []
    original = latency.timing_session
    monkeypatch.setattr(latency, "timing_session", lambda p, n: threads.append(n) or original(p, n))
    eager = _Threads(model)
    before = torch.get_num_threads()
    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    result = latency.measure_latency(eager, {"onnx_fp32": path, "again": path}, x, plan, input_name=INPUT_NAME,
                                     threads=1)
    assert list(result) == ["pytorch", "onnx_fp32", "again"]
    assert all(set(r) == {"batch_1_ms", "batch_3_ms"} and all(v > 0 for v in r.values()) for r in result.values())
    assert threads == [1, 1] and eager.seen == {1}
    assert torch.get_num_threads() == before  # PyTorch's own setting comes back afterwards


def test_a_busy_machine_is_named_in_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(latency.os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    with caplog.at_level(logging.WARNING, logger="fmtransfer.export.latency"):
        assert latency.warn_if_busy(2) == 64.0
    assert "load average 64.0" in caplog.text
    monkeypatch.setattr(latency.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    caplog.clear()
    latency.warn_if_busy(2)
    assert not caplog.records


def test_a_batch_cycles_through_the_sample():
    sample = np.arange(3, dtype=np.float64).reshape(3, 1, 1, 1)
    batch = latency.batch_of(sample, 5)
    assert batch.dtype == np.float32 and batch.flags.c_contiguous
    assert batch.ravel().tolist() == [0, 1, 2, 0, 1]
