"""Config plumbing: where configs live, OmegaConf resolvers, and early validation helpers."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf

from fmtransfer.errors import ConfigError

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR_ENV = "FMTRANSFER_CONFIG_DIR"    # replaces the packaged configs
CONFIG_PATH_ENV = "FMTRANSFER_CONFIG_PATH"  # adds the user's own config groups beside them
SEARCHPATH = "hydra.searchpath"


def config_dir() -> Path:
    """The primary Hydra config directory: the package's ``configs/``, or ``$FMTRANSFER_CONFIG_DIR``."""
    path = Path(os.environ.get(CONFIG_DIR_ENV, PACKAGE_CONFIGS))
    if not path.is_dir():
        raise ConfigError(f"config directory {path} does not exist (set {CONFIG_DIR_ENV})")
    return path


def user_config_dirs() -> list[Path]:
    """The directories of ``$FMTRANSFER_CONFIG_PATH`` (``os.pathsep``-separated), which hold a user's own
    config groups (``data/<name>.yaml``, ``experiment/<name>.yaml``, ...)."""
    dirs = []
    for entry in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep):
        if not entry:
            continue
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"{CONFIG_PATH_ENV}: config directory {entry} does not exist")
        if "'" in str(path) or "${" in str(path) or str(path).endswith("\\"):
            # the path goes into a quoted Hydra override, where these would read as syntax
            raise ConfigError(f"{CONFIG_PATH_ENV}: config directory {entry} has a quote, '${{' or a trailing "
                              f"backslash in its path; move or link it elsewhere")
        dirs.append(path)
    return dirs


def with_search_path(args: Sequence[str], inherited: Sequence[str] = ()) -> list[str]:
    """``args`` (overrides, or a stage's command line) with the dirs of ``$FMTRANSFER_CONFIG_PATH`` added to
    ``hydra.searchpath``.

    Hydra reads one ``hydra.searchpath`` override, so the entries are merged into it: those of the user's own
    override (or, without one, ``inherited``: a running app's search path) first, then the environment's.

    Args:
        args: Hydra overrides; other command-line words (``-m``, ``--cfg job``) pass through.
        inherited: search-path entries to keep when ``args`` has no ``hydra.searchpath`` override.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = list(args)
    given = [i for i, a in enumerate(args) if a.startswith(f"{SEARCHPATH}=")]
    entries = [str(e) for e in inherited]
    if given:
        entries = OverridesParser.create().parse_override(args[given[-1]]).value()
        if not isinstance(entries, list):
            return args  # Hydra names the bad value itself
    extra = [f"file://{d}" for d in user_config_dirs()]
    if not extra and (given or not entries):
        return args
    merged = [str(e) for e in entries] + [e for e in extra if e not in entries]
    override = f"{SEARCHPATH}=[{','.join(_quoted(e) for e in merged)}]"
    if given:
        args[given[-1]] = override
        return [a for i, a in enumerate(args) if i not in given[:-1]]
    # beside the other overrides: Hydra's command line takes its overrides as one run of words between flags
    at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), 0)
    return [*args[:at], override, *args[at:]]


def _quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra override value."""
    return "'" + value.replace("'", "\\'") + "'"


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
    """Compose ``configs/<stage>.yaml`` with overrides, inside a running Hydra app or outside one.

    The user's config dirs take part: ``hydra.searchpath=[file:///dir]`` in ``overrides``, the dirs of
    ``$FMTRANSFER_CONFIG_PATH`` and, inside a running app, that app's own search path.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if GlobalHydra.instance().is_initialized():
        inherited = list(HydraConfig.get().searchpath) if HydraConfig.initialized() else []
        return compose(config_name=stage, overrides=with_search_path(overrides, inherited))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=stage, overrides=with_search_path(overrides))


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


def require(cfg: DictConfig, *keys: str) -> None:
    """Refuse ``cfg`` when it lacks any of the dotted ``keys``, naming them.

    A stage's entry config (``configs/<stage>.yaml``) sets every key the stage reads, and is the only place their
    defaults live; this turns a hand-built config's gap into one clear line instead of an attribute error mid-run.
    A key set to ``???`` is there: reading it later tells the user to pass it.
    """
    missing = [k for k in keys if not _has_key(cfg, k)]
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join(missing)} (compose the stage's config with "
                          f"fmtransfer.config.compose_stage, or set them)")


def _has_key(cfg: DictConfig, key: str) -> bool:
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node.keys():  # keys(): ??? values too, unresolved
            return False
        if i < len(parts) - 1:
            node = None if OmegaConf.is_missing(node, part) else node[part]
    return True


def run_dir(cfg: DictConfig) -> Path:
    try:
        path = Path(cfg.run_dir)
    except Exception as e:  # noqa: BLE001 - ${hydra:...} outside a Hydra app
        raise ConfigError("run_dir is not set: pass run_dir=<folder> when calling a stage from Python") from e
    path.mkdir(parents=True, exist_ok=True)
    return path
