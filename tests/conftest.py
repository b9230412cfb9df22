"""Shared fixtures: Hydra composition of real entry configs, with outputs in tmp_path."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from fmtransfer.config import config_dir
from fmtransfer.lineage import sha256_file

ROOT = Path(__file__).resolve().parents[1]
# fast defaults for tests: tiny backbone, a few batches, no logger noise
FAST = ["backbone=tiny_cnn", "trainer=debug", "logger=csv", "loader.batch_size=32"]


_DESELECTED = pytest.StashKey[int]()


def pytest_configure(config) -> None:
    """Under pytest-xdist (``-n N``) the N workers share the cores: each worker, and the CLI processes its tests
    start, gets its share of torch's threads instead of one thread per core each (oversubscribed, every test
    waits on the others' spinning threads)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


def pytest_deselected(items) -> None:
    if items:
        stash = items[0].config.stash
        stash[_DESELECTED] = stash.get(_DESELECTED, 0) + len(items)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Pass when the tier's markers left none of the selected tests (``make test-slow ARGS=tests/data``).

    pytest's exit code 5, "no tests collected", stays for a path or ``-k`` expression that matched no test.
    """
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: the controller decides, from its count
        session.config.workeroutput["deselected"] = session.config.stash.get(_DESELECTED, 0)
        return
    deselected_by_markers = session.config.stash.get(_DESELECTED, 0) and not session.config.option.keyword
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and deselected_by_markers:
        session.exitstatus = pytest.ExitCode.OK


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist's controller: add up what the workers' markers deselected (for pytest_sessionfinish)."""
    stash = node.config.stash
    stash[_DESELECTED] = stash.get(_DESELECTED, 0) + getattr(node, "workeroutput", {}).get("deselected", 0)


def _isolate(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setenv("FMTRANSFER_CACHE", str(cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """The same for session and module fixtures, which are set up before a test's own _isolated_env."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("session_cache"))
        yield


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test writes to ~/.cache or reaches W&B; the scan cache goes to a temp folder."""
    _isolate(monkeypatch, tmp_path_factory.mktemp("cache"))


def make_cfg(stage: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """Compose ``configs/<stage>.yaml`` with overrides, as the CLI would, writing into ``run_dir``."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=[*overrides, f"run_dir={run_dir}"])
    return cfg


# session-wide trained runs that many tests read; _shared_runs_unchanged checks after each test that it left them alone
SHARED_RUNS = ("base", "vit_base", "onnx_model")


def _pretrained(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    # imported here so that collecting the suite does not import Lightning for tests that never train
    from fmtransfer.tasks.pretrain import pretrain

    return pretrain(make_cfg("pretrain", ["experiment=smoke", *overrides], tmp_path_factory.mktemp(name) / "run")).run_dir


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """The run dir of a tiny base (experiment=smoke: tiny_cnn, mnist_global), trained once per session.

    Shared and read-only: a test that needs to change it copies it first (shutil.copytree).
    """
    return _pretrained(tmp_path_factory, "base", [])


@pytest.fixture(scope="session")
def vit_base(tmp_path_factory) -> Path:
    """Like ``base`` with backbone=tiny_vit, for the methods that need a Vision Transformer."""
    return _pretrained(tmp_path_factory, "vit_base", ["backbone=tiny_vit"])


@pytest.fixture(scope="session")
def onnx_model(base, tmp_path_factory) -> Path:
    """``base`` exported to ONNX fp32 (its 'embedding' output included) over 300 mnist_global images, once per
    session, for the stages that read an ONNX file (predict, shadow). Read-only like ``base``: its export run dir
    is checked for changes after every test that uses it."""
    from fmtransfer.tasks.export import export

    folder = tmp_path_factory.mktemp("onnx_model") / "export"
    return export(make_cfg("export", [f"model={base}", "data=mnist_global", "data.limit=300", "export.quantize=none",
                                      "export.latency.repeats=1", "export.latency.warmup=0"], folder)).outputs["model"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _shared_runs_unchanged(request):
    """Fail the test that wrote into a shared run: every later test would read what it left."""
    used = {name: request.getfixturevalue(name) for name in SHARED_RUNS if name in request.fixturenames}
    used = {name: run if run.is_dir() else run.parent for name, run in used.items()}
    before = {name: _digest(run) for name, run in used.items()}
    yield
    for name, run in used.items():
        after = _digest(run)
        changed = sorted(k for k in before[name].keys() | after.keys() if before[name].get(k) != after.get(k))
        assert not changed, f"the test changed the shared {name} run {run}: {changed}; copy it first"


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(stage: str, *overrides: str, run_dir: Path | None = None) -> DictConfig:
        return make_cfg(stage, list(overrides), run_dir or tmp_path / stage)
    return factory


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group of a test (tests may run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))
