"""Settings in one place: the YAML holds every default; the dataclasses check values and name the key at fault."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import pytest
from omegaconf import OmegaConf

from fmtransfer.config import build_dataclass, require
from fmtransfer.errors import ConfigError


class Colour(str, Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    colour: Colour
    on: bool


@dataclass(frozen=True)
class Outer:
    inner: Inner
    count: int
    share: float | None


def test_build_dataclass_builds_nested_settings_and_enums():
    built = build_dataclass(Outer, {"inner": {"colour": "blue", "on": False}, "count": 3, "share": 1}, "x")
    assert built == Outer(Inner(Colour.BLUE, False), 3, 1)


@pytest.mark.parametrize("values,message", [
    ({"inner": {"colour": "green", "on": True}, "count": 1, "share": None},
     r"x.inner.colour='green' is not allowed; expected one of: 'red', 'blue'"),
    ({"inner": {"colour": "red", "on": "yes"}, "count": 1, "share": None}, r"x.inner.on='yes': expected true or false"),
    ({"inner": {"colour": "red", "on": True}, "count": "17", "share": None}, r"x.count='17': expected an integer"),
    ({"inner": {"colour": "red", "on": True}, "count": True, "share": None}, r"x.count=True: expected an integer"),
    ({"inner": {"colour": "red", "on": True}, "count": 1, "share": "half"},
     r"x.share='half': expected a number or null"),
    ({"inner": {"colour": "red"}, "count": 1, "share": None}, r"missing required key\(s\): x.inner.on"),
    ({"inner": {"colour": "red", "on": True, "shade": 2}, "count": 1, "share": None},
     r"unknown key\(s\) x.inner.shade; allowed: colour, on"),
])
def test_build_dataclass_names_the_key_and_what_it_takes(values, message):
    with pytest.raises(ConfigError, match=message):
        build_dataclass(Outer, values, "x")


def test_require_names_missing_keys():
    cfg = OmegaConf.create({"seed": 0, "export": {"split": "test"}})
    require(cfg, "seed", "export.split")
    with pytest.raises(ConfigError, match=r"missing config key\(s\): export.opset, loader"):
        require(cfg, "seed", "export.opset", "loader")
