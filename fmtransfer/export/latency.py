"""Latency of an export's variants (PyTorch eager, ONNX fp32, ONNX INT8) on this machine's CPU, timed alike.

What keeps the comparison fair (measured for issue #11, see ``scripts/bench_export.py --latency-only``):

- Every ONNX file gets a session made for timing, all with the same options: as many intra-op threads as
  PyTorch gets (the CPUs this process may run on, unless ``threads`` says otherwise), one inter-op thread,
  full graph optimisation (the level the released model runs at).
- onnxruntime's threads spin between the kernels of a run but stop when the run returns
  (``session.force_spinning_stop``). Without that an idle session's threads keep spinning after its block,
  and on a machine with few cores they take a core from the next variant's timed calls.
- The variants take turns in ``rounds`` rounds (in a rotating order), each block after its own ``warmup``
  untimed calls, so that a slow spell of a shared machine hits all of them alike; a speed-up is best read from
  :func:`round_ratios`, which compares variants within each round.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Runner = Callable[[np.ndarray], Any]
log = logging.getLogger(__name__)


def cpu_threads() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def timing_session(path: str | Path, threads: int):
    """A CPU InferenceSession over ``path`` with the options above."""
    import onnxruntime as ort

    from fmtransfer.export.runtime import session_options

    options = session_options(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def time_rounds(runners: Mapping[str, Runner], x: np.ndarray, *, repeats: int, warmup: int, rounds: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[list[float]]]:
    """Times (ms, wall clock unless ``clock`` says otherwise) of ``repeats`` calls ``runners[name](x)`` per
    variant, grouped by round.

    In each of ``rounds`` rounds every variant in turn makes ``warmup`` untimed calls, then its share of the timed
    ones. The order rotates from round to round, so that whatever one runtime leaves behind (PyTorch's OpenMP
    threads spin for a few ms after a call too) does not always fall on the same variant. ``clock=time.thread_time`` with single-threaded runners gives the CPU time of each call: the work, which
    other processes' load does not change. Returns {name: [[ms, ...] per round]}.
    """
    rounds = max(1, min(rounds, repeats))
    names = list(runners)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        share = repeats // rounds + (r < repeats % rounds)
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = runners[name]
            for _ in range(warmup):
                run(x)
            block = []
            for _ in range(share):
                start = clock()
                run(x)
                block.append((clock() - start) * 1e3)
            times[name].append(block)
    return times


def median_ms(per_round: list[list[float]]) -> float:
    """The median of all timed calls of one variant."""
    return statistics.median(t for block in per_round for t in block)


def round_ratios(times: Mapping[str, list[list[float]]], slow: str, fast: str) -> list[float]:
    """Per round, median time of ``slow`` over median time of ``fast``: how many times ``fast``'s throughput is
    ``slow``'s, measured within the round (so a load change between rounds cancels out)."""
    return [statistics.median(a) / statistics.median(b) for a, b in zip(times[slow], times[fast], strict=True)]


@contextmanager
def _torch_threads(threads: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batch_of(sample: np.ndarray, batch_size: int) -> np.ndarray:
    """``batch_size`` inputs made by cycling through ``sample`` (N, C, H, W), float32 and contiguous."""
    return np.ascontiguousarray(np.resize(sample, (batch_size, *sample.shape[1:])), dtype=np.float32)


class LatencyPlan(Protocol):
    """What :func:`measure_latency` reads from ``export.latency``."""

    batch_sizes: list[int]
    repeats: int
    warmup: int
    rounds: int


def measure_latency(model: Any, onnx_files: Mapping[str, str | Path], sample: np.ndarray, plan: LatencyPlan, *,
                    input_name: str, threads: int | None = None) -> dict[str, dict[str, float]]:
    """Median latency per variant and batch size.

    Args:
        model: the PyTorch module (eval mode, CPU), timed as ``pytorch``; None leaves it out.
        onnx_files: {variant name: .onnx file}, each timed on its own session (see the module docstring).
        sample: real inputs (N, C, H, W) float32; each batch cycles through them.
        plan: batch sizes, timed calls per variant (``repeats``), ``warmup`` calls per block, ``rounds``.
        threads: intra-op threads for every variant (None: :func:`cpu_threads`).

    Returns:
        {variant: {"batch_<n>_ms": median ms}} with ``pytorch`` first, then ``onnx_files``' order.
    """
    import torch

    threads = threads or cpu_threads()
    runners: dict[str, Runner] = {}
    if model is not None:
        def eager(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(x))

        runners["pytorch"] = eager
    for name, path in onnx_files.items():
        session = timing_session(path, threads)
        runners[name] = lambda x, s=session: s.run(None, {input_name: x})
    result: dict[str, dict[str, float]] = {name: {} for name in runners}
    with _torch_threads(threads):
        for bs in plan.batch_sizes:
            times = time_rounds(runners, batch_of(sample, int(bs)), repeats=int(plan.repeats),
                                warmup=int(plan.warmup), rounds=int(plan.rounds))
            for name, per_round in times.items():
                result[name][f"batch_{bs}_ms"] = median_ms(per_round)
    warn_if_busy(threads)
    return result


def warn_if_busy(threads: int) -> float:
    """Logs a warning when the machine's load average exceeds its CPUs: wall times then include waiting for a
    core, and multi-threaded runs wait at every parallel step for a descheduled thread. Returns the 1-minute
    load average."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return 0.0
    cpus = os.cpu_count() or 1
    if load > cpus:
        log.warning("latency was timed while the machine was busy (load average %.1f on %d CPUs, %d threads per "
                    "variant): the timings include waiting for a core; compare variants only within one run",
                    load, cpus, threads)
    return load
