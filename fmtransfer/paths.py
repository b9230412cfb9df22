"""Where fmtransfer keeps what it makes outside run folders: the one place the environment variables are read.

- ``$FMTRANSFER_CACHE`` (default ``~/.cache/fmtransfer``; empty: no cache): the image scan cache, the pipeline's
  step index (``steps/``) and the registry's default file.
- ``$FMTRANSFER_DATA`` (default ``<cache>/data``): the real data sets ``scripts/get_real_data.py`` writes (the
  recipes' own ``${oc.env:FMTRANSFER_DATA,...}`` reads the same variable).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FMTRANSFER_CACHE"
DATA_ENV = "FMTRANSFER_DATA"
DEFAULT_CACHE = Path("~/.cache/fmtransfer")


def cache_dir() -> Path | None:
    """``$FMTRANSFER_CACHE``, else ``~/.cache/fmtransfer``; None when the variable is set empty (caches off)."""
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return DEFAULT_CACHE.expanduser()
    return Path(value).expanduser() if value.strip() else None


def data_dir() -> Path:
    """``$FMTRANSFER_DATA``, else ``~/.cache/fmtransfer/data`` (the recipes' default, whatever the cache says)."""
    value = os.environ.get(DATA_ENV, "").strip()
    return Path(value).expanduser() if value else DEFAULT_CACHE.expanduser() / "data"
