"""Strict config loading: unknown keys, wrong types, nested sections, overrides."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from src.utils.config import ConfigError, apply_overrides, from_dict, load_yaml_config, read_yaml, to_dict


@dataclass
class Inner:
    mode: Literal["fast", "slow"] = "fast"
    size: int = 1


@dataclass
class Pair:
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Outer:
    name: str
    rate: float = 0.1
    flags: list[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_valid_config_and_round_trip():
    cfg = from_dict(Outer, {"name": "a", "rate": 1, "flags": [1, 2], "inner": {"mode": "slow"}, "maybe": 3})
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.inner == Inner(mode="slow", size=1)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'rat'.*Did you mean 'rate'"):
        from_dict(Outer, {"name": "a", "rat": 0.2})


def test_unknown_nested_key_names_section():
    with pytest.raises(ConfigError, match=r"unknown key 'inner.sise'.*Did you mean 'size'"):
        from_dict(Outer, {"name": "a", "inner": {"sise": 2}}, where="train.yaml")


@pytest.mark.parametrize(
    "data,pattern",
    [
        ({"name": 3}, r"key 'name': expected a string"),
        ({"name": "a", "rate": "fast"}, r"key 'rate': expected a number"),
        ({"name": "a", "flags": [1, "x"]}, r"key 'flags\[1\]': expected an integer"),
        ({"name": "a", "inner": {"mode": "fsat"}}, r"key 'inner.mode': 'fsat' is not one of.*Did you mean 'fast'"),
        ({"name": "a", "inner": {"size": True}}, r"key 'inner.size': expected an integer"),
        ({"name": "a", "maybe": 1.5}, r"key 'maybe': expected an integer"),
        ({}, r"missing required key\(s\): name"),
    ],
)
def test_wrong_types_are_named(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Outer, data)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_yaml_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml_config(Outer, bad)
    good = tmp_path / "good.yaml"
    good.write_text("name: x\nrate: 1.0e-3\n")
    assert load_yaml_config(Outer, good).rate == 1e-3


def test_fixed_length_tuple_checks_its_length_and_each_item():
    assert from_dict(Pair, {"betas": [1, 0.5]}).betas == (1.0, 0.5)
    with pytest.raises(ConfigError, match=r"key 'betas': expected a list of 2 items \(float, float\), got 1: \[0.9\]"):
        from_dict(Pair, {"betas": [0.9]})
    with pytest.raises(ConfigError, match=r"key 'betas\[1\]': expected a number"):
        from_dict(Pair, {"betas": [0.9, "x"]})


def test_a_key_given_twice_is_an_error_naming_it(tmp_path):
    """PyYAML keeps the last of two equal keys silently; a second block would replace the first."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: x\ninner:\n  size: 1\n  mode: slow\n  size: 2\n")
    named = r"dup.yaml: line 5: key 'size' appears twice in one mapping \(first on line 3\)"
    with pytest.raises(ConfigError, match=named):
        load_yaml_config(Outer, dup)
    dup.write_text("name: x\ninner: {size: 1}\nrate: 0.5\ninner: {mode: slow}\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'inner' appears twice .*first on line 2"):
        load_yaml_config(Outer, dup)
    with pytest.raises(ConfigError, match=r"key 'size' appears twice"):
        apply_overrides({}, ["inner={size: 1, size: 2}"])
    merged = tmp_path / "merged.yaml"  # a merge key overrides on purpose: still allowed
    merged.write_text("base: &base {size: 1, mode: slow}\nname: x\ninner:\n  <<: *base\n  size: 2\n")
    assert read_yaml(merged)["inner"] == {"size": 2, "mode": "slow"}


def test_overrides():
    data = apply_overrides({"name": "a", "inner": {"size": 1}}, ["inner.size=4", "rate=0.5", "inner.mode=slow"])
    assert from_dict(Outer, data) == Outer(name="a", rate=0.5, inner=Inner(mode="slow", size=4))
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["inner.size"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"name": "a"}, ["name.x=1"])
