"""fmtransfer.paths: the one reader of $FMTRANSFER_CACHE / $FMTRANSFER_DATA, and the places that use it."""

from pathlib import Path

from fmtransfer.data.images import default_cache_dir
from fmtransfer.lineage.registry import default_path
from fmtransfer.paths import cache_dir, data_dir
from fmtransfer.tasks.step_cache import index_dir


def test_cache_dir_default_set_and_off(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FMTRANSFER_CACHE", raising=False)
    monkeypatch.delenv("FMTRANSFER_REGISTRY", raising=False)
    home_cache = tmp_path / "home" / ".cache" / "fmtransfer"
    assert cache_dir() == default_cache_dir() == home_cache
    assert index_dir() == home_cache / "steps" and default_path() == home_cache / "registry.sqlite"

    monkeypatch.setenv("FMTRANSFER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == default_cache_dir() == tmp_path / "c"
    assert index_dir() == tmp_path / "c" / "steps" and default_path() == tmp_path / "c" / "registry.sqlite"

    monkeypatch.setenv("FMTRANSFER_CACHE", "")  # caches off; the registry keeps its default file
    assert cache_dir() is None and default_cache_dir() is None and index_dir() is None
    assert default_path() == home_cache / "registry.sqlite"


def test_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FMTRANSFER_CACHE", str(tmp_path / "elsewhere"))  # the recipes' default ignores it
    monkeypatch.delenv("FMTRANSFER_DATA", raising=False)
    assert data_dir() == tmp_path / ".cache" / "fmtransfer" / "data"
    monkeypatch.setenv("FMTRANSFER_DATA", "~/d")
    assert data_dir() == Path(tmp_path / "d")
