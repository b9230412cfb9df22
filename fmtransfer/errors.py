"""Errors that reach users.

Every error the framework raises on purpose is an :class:`FmtError`: the CLI prints its message without a
traceback and exits with status 2. Messages name the file, key or value at fault and what was expected.
"""

from __future__ import annotations


class FmtError(Exception):
    """Base class for errors caused by user input (config, data, artifacts)."""


class ConfigError(FmtError):
    """A config key has a value that cannot work."""


class DataError(FmtError):
    """A data source is missing, empty, malformed or does not fit the config."""


class ArtifactError(FmtError):
    """An artifact (checkpoint, model, adapter, run dir) is missing, corrupt or does not fit."""
