"""Config plumbing: where configs live, OmegaConf resolvers, and early validation helpers."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf

from fmtransfer.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """The Hydra config directory (``FMTRANSFER_CONFIG_DIR`` overrides the checkout's ``configs/``)."""
    path = Path(os.environ.get("FMTRANSFER_CONFIG_DIR", PROJECT_ROOT / "configs"))
    if not path.is_dir():
        raise ConfigError(f"config directory {path} does not exist (set FMTRANSFER_CONFIG_DIR)")
    return path


def wandb_offline() -> bool:
    """W&B runs offline unless the user has logged in (API key in the environment or ~/.netrc)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"] in ("offline", "disabled", "dryrun")
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" not in netrc.read_text()
    except OSError:
        return True


def register_resolvers() -> None:
    """Register the ``fmt.*`` resolvers once (idempotent)."""
    if not OmegaConf.has_resolver("fmt.wandb_offline"):
        OmegaConf.register_new_resolver("fmt.wandb_offline", wandb_offline)


register_resolvers()


def build(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with a clear error naming the config key when the object cannot be built."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        raise ConfigError(f"{key}: cannot build {target} ({type(cause).__name__}: {cause})") from e


def compose_stage(stage: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<stage>.yaml`` with overrides, inside a running Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=stage, overrides=overrides)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=stage, overrides=overrides)


def to_plain(node: Any) -> Any:
    """DictConfig/ListConfig -> plain dict/list (resolved); other values pass through."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, with clear errors that name the config key.

    Unknown and missing keys are refused; a field typed with a nested dataclass is built from its sub-mapping, an
    ``Enum`` field from its value; ``Literal``, ``bool``, ``int`` and ``float`` fields (optional or not) are checked.

    Args:
        cls: a dataclass type.
        values: a dict or DictConfig.
        where: the config key that holds ``values`` (named in errors), e.g. ``"data"``; ``""`` for the root.
    """
    values = to_plain(values)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(values).__name__}: {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(_key(where, k) for k in unknown)}; "
                          f"allowed: {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(_key(where, k) for k in missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _field_value(hints.get(name), value, _key(where, name)) for name, value in values.items()})


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _field_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` checked against ``hint`` and, for dataclass and Enum hints, converted."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build_dataclass(hint, value, key)
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not allowed; expected one of: "
                              f"{', '.join(repr(m.value) for m in hint)}") from None
    check_literal(hint, value, key)
    _check_scalar(hint, value, key)
    return value


_SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number")}


def _check_scalar(hint: Any, value: Any, key: str) -> None:
    """Refuse a value of the wrong kind for a ``bool``, ``int`` or ``float`` field (or an optional one): a string
    ``"yes"`` would otherwise pass as true, ``"17"`` compare as text."""
    args = get_args(hint) if get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a in _SCALARS]
    if not kinds or len(kinds) != len([a for a in args if a is not type(None)]):
        return  # not a plain scalar field (lists, mappings, unions with other types): the dataclass checks it
    if value is None and type(None) in args:
        return
    if (isinstance(value, bool) and bool not in kinds) or not any(isinstance(value, _SCALARS[k][0]) for k in kinds):
        expected = " or ".join([_SCALARS[k][1] for k in kinds] + (["null"] if type(None) in args else []))
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def check_literal(hint: Any, value: Any, key: str) -> None:
    """Raise ConfigError if ``hint`` is a Literal (or Optional Literal) that does not admit ``value``."""
    if hint is None:
        return
    options: tuple = ()
    if get_origin(hint) is Literal:
        options = get_args(hint)
    else:
        for arg in get_args(hint):
            if get_origin(arg) is Literal:
                options = get_args(arg) + ((None,) if type(None) in get_args(hint) else ())
    if options and value not in options:
        raise ConfigError(f"{key}={value!r} is not allowed; expected one of: "
                          f"{', '.join(repr(o) for o in options)}")


_ABSENT = object()


def require(cfg: DictConfig, *keys: str) -> None:
    """Refuse ``cfg`` when it lacks any of the dotted ``keys``, naming them.

    A stage's entry config (``configs/<stage>.yaml``) sets every key the stage reads, and is the only place their
    defaults live; this turns a hand-built config's gap into one clear line instead of an attribute error mid-run.
    """
    missing = [k for k in keys if OmegaConf.select(cfg, k, default=_ABSENT, throw_on_missing=True) is _ABSENT]
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join(missing)} (compose the stage's config with "
                          f"fmtransfer.config.compose_stage, or set them)")


def run_dir(cfg: DictConfig) -> Path:
    try:
        path = Path(cfg.run_dir)
    except Exception as e:  # noqa: BLE001 - ${hydra:...} outside a Hydra app
        raise ConfigError("run_dir is not set: pass run_dir=<folder> when calling a stage from Python") from e
    path.mkdir(parents=True, exist_ok=True)
    return path
