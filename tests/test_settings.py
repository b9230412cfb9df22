"""Settings in one place: the YAML holds every default; the dataclasses check values and name the key at fault."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from enum import Enum

import pytest
from omegaconf import OmegaConf, open_dict

from fmtransfer.adapters.calibration import Strategy
from fmtransfer.adapters.regional import RegionalPretrainSettings
from fmtransfer.adapters.settings import AdapterSettings, AdaptSettings, CalibrationSettings
from fmtransfer.config import build_dataclass, config_dir, require
from fmtransfer.errors import ConfigError
from fmtransfer.export.gates import GateSettings
from fmtransfer.export.quantize import Quantize
from fmtransfer.export.settings import ExportCalibration, ExportSettings, KeepFp32, LatencySettings
from fmtransfer.tasks.adapt import adapt, validate_adapt
from fmtransfer.tasks.export import export, export_settings
from fmtransfer.tasks.pipeline import PipelineSettings, RegionalSwitch, RegionCalibration, Sweep
from tests.conftest import make_cfg


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


def _without(cfg, key: str):
    """``cfg`` with the dotted ``key`` removed, as a hand-built config might lack it."""
    parent, _, name = key.rpartition(".")
    with open_dict(cfg):
        (OmegaConf.select(cfg, parent) if parent else cfg).pop(name)
    return cfg


SETTINGS = [ExportSettings, ExportCalibration, KeepFp32, LatencySettings, GateSettings,
            AdaptSettings, AdapterSettings, CalibrationSettings, PipelineSettings, RegionCalibration, Sweep,
            RegionalPretrainSettings, RegionalSwitch]


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_settings_have_no_defaults_of_their_own(cls):
    """The YAML is the only source of defaults: a dataclass default could disagree with it unnoticed."""
    assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(cls))


def test_export_settings_are_the_yaml(tmp_path):
    settings = export_settings(make_cfg("export", [], tmp_path))
    yaml = OmegaConf.load(config_dir() / "export" / "default.yaml")
    assert settings.calibration.method == yaml.calibration.method == "percentile"
    assert settings.calibration.bias_correction is yaml.calibration.bias_correction is True
    assert settings.quantize is Quantize(yaml.quantize) and settings.keep_fp32.nodes(Quantize.STATIC) == ["first", "last"]


@pytest.mark.parametrize("override,message", [
    ("export.quantize=int4", r"export.quantize='int4' is not allowed; expected one of: 'auto', 'none', 'dynamic'"),
    ("export.exporter=onnx", r"export.exporter='onnx' is not allowed; expected one of: 'torchscript', 'dynamo'"),
    ("export.calibration.method=best",
     r"export.calibration.method='best' is not allowed; expected one of: 'minmax', 'entropy', 'percentile'"),
    ("export.per_channel=sometimes", r"export.per_channel='sometimes': expected true or false"),
    ("export.latency.repeats=0", r"export.latency: repeats=0"),
    ("export.calibration.split=test", r"export.calibration.split='test' is the split the gates score on"),
])
def test_export_refuses_a_wrong_value_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        export(make_cfg("export", ["model=/nowhere", override], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["export.calibration.method", "export.calibration.bias_correction",
                                 "export.latency.rounds"])
def test_export_refuses_a_missing_key_instead_of_a_default(key, tmp_path):
    """Before, a missing calibration.method fell back to minmax and bias_correction to off, against the YAML."""
    cfg = _without(make_cfg("export", ["model=/nowhere"], tmp_path / "run"), key)
    with pytest.raises(ConfigError, match=rf"missing required key\(s\): {key}"):
        export(cfg)
    assert not (tmp_path / "run").exists()


def test_a_stage_names_a_missing_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"missing config key\(s\): loader"):
        export(_without(make_cfg("export", ["model=/nowhere"], tmp_path / "run"), "loader"))


def test_adapt_settings_are_the_yaml(tmp_path):
    settings, _, method = validate_adapt(make_cfg("adapt", ["base=/nowhere"], tmp_path))
    yaml = OmegaConf.load(config_dir() / "adapt.yaml")
    assert settings.calibration.size == yaml.calibration.size and settings.calibration.strategy is Strategy.STRATIFIED
    assert settings.adapter.steps == 300 and method.name == "lora"
    assert (settings.checkpoints, settings.keep_checkpoints) == (yaml.checkpoints, yaml.keep_checkpoints)


@pytest.mark.parametrize("override,message", [
    ("calibration.strategy=best", r"calibration.strategy='best' is not allowed; expected one of: 'random', "
                                  r"'stratified', 'diverse'"),
    ("adapter.steps=0", r"adapter.steps=0 must be >= 1"),
    ("calibration.size=0", r"calibration.size=0 must be a positive integer"),
    ("keep_checkpoints=maybe", r"keep_checkpoints='maybe': expected true or false"),
    ("checkpoints=0", r"checkpoints=0 must be >= 1"),
])
def test_adapt_refuses_a_wrong_value_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        adapt(make_cfg("adapt", ["base=/nowhere", override], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,message", [("adapter.steps", r"missing required key\(s\): adapter.steps"),
                                         ("keep_checkpoints", r"missing config key\(s\): keep_checkpoints")])
def test_adapt_refuses_a_missing_key(key, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        adapt(_without(make_cfg("adapt", ["base=/nowhere"], tmp_path / "run"), key))


def test_require_takes_a_mandatory_placeholder_as_present():
    """``base: ???`` is a key the user must pass: reading it says so (the CLI's "pass base=..."), not require."""
    cfg = OmegaConf.create({"base": "???", "run_dir": "${hydra:runtime.output_dir}", "data": {"name": "x"}})
    require(cfg, "base", "run_dir", "data.name")  # nothing resolved
    with pytest.raises(ConfigError, match=r"missing config key\(s\): base.path, data.size"):
        require(cfg, "base.path", "data.size")
