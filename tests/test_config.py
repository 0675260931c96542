"""Typed binding of ConfigDicts: every mistake is an error that names the key path."""

import dataclasses
from typing import Literal

import ml_collections
import pytest

from expint_jax.config import ConfigError, bind, load_config_file, to_dict


@dataclasses.dataclass(frozen=True)
class Optimizer:
    learning_rate: float = 1e-5
    warmup_steps: int = 0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class Distill:
    regime: Literal["off_policy", "on_policy", "sft"] = "off_policy"
    optimizer: Optimizer = Optimizer()
    stop: tuple[str, ...] = ()
    checkpoint: str | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    iterations: int = 3
    distill: Distill = Distill()


def _config(**distill):
    return {"name": "demo", "iterations": 2, "distill": {"regime": "sft", **distill}}


def test_binds_nested_sections_with_conversions():
    config = ml_collections.ConfigDict(_config(optimizer={"learning_rate": 3, "warmup_steps": 5}, stop=["a", "b"]))
    run = bind(Run, config)
    assert run == Run("demo", 2, Distill("sft", Optimizer(3.0, 5), ("a", "b")))
    assert isinstance(run.distill.optimizer.learning_rate, float)
    assert to_dict(run)["distill"]["optimizer"] == {"learning_rate": 3.0, "warmup_steps": 5}


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["distill"].update({"optimiser": {}}), r"config\.distill: unknown key 'optimiser'; valid keys: checkpoint, optimizer, regime, stop"),
    (lambda c: c["distill"].update({"regime": "online"}), r"config\.distill\.regime: 'online' is not one of 'off_policy', 'on_policy', 'sft'"),
    (lambda c: c.update({"iterations": "3"}), r"config\.iterations: expected int, got str '3'"),
    (lambda c: c.update({"iterations": True}), r"config\.iterations: expected int, got bool"),
    (lambda c: c["distill"].update({"optimizer": {"learning_rate": -1.0}}), r"config\.distill\.optimizer: learning_rate must be > 0"),
    (lambda c: c["distill"].update({"stop": "abc"}), r"config\.distill\.stop: expected a list"),
    (lambda c: c["distill"].update({"checkpoint": 5}), r"config\.distill\.checkpoint: expected str, got int 5"),
])
def test_mistakes_name_the_key(mutate, message):
    config = _config()
    mutate(config)
    with pytest.raises(ConfigError, match=message):
        bind(Run, config)


def test_required_keys_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.name: required key is missing"):
        bind(Run, {"iterations": 1})
    path = tmp_path / "exp.py"
    path.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'name': 'x'})\n")
    assert bind(Run, load_config_file(path)).name == "x"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config_file(tmp_path / "bad.py")


def _parse(tmp_path, *argv):
    from expint_jax.config import parse_command_line

    path = tmp_path / "exp.py"
    if not path.exists():
        path.write_text("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict("
                        "{'name': 'x', 'distill': {'regime': 'sft', 'optimizer': {'learning_rate': 1e-5}}})\n"
                        "    c.lock()\n    return c\n")
    return parse_command_line("expint test", list(argv), path)


@pytest.mark.parametrize("override, message", [
    ("--config.bogus=1", r"^config\.bogus: unknown key; valid keys at config: distill, name$"),
    ("--config.distill.optimizer.lr=1", r"^config\.distill\.optimizer\.lr: unknown key; valid keys at "
                                        r"config\.distill\.optimizer: learning_rate$"),
    ("--config.distill.regim=sft", r"^config\.distill\.regim: unknown key \(did you mean config\.distill\.regime\?\)"),
    ("--config.name.first=a", r"^config\.name\.first: config\.name is not a section \(it holds 'x'\)$"),
])
def test_unknown_override_keys_are_named_by_their_full_path(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _parse(tmp_path, override)


def test_the_config_file_may_come_after_its_overrides(tmp_path):
    _parse(tmp_path)  # writes exp.py
    config = _parse(tmp_path, "--config.name=y", "--config", str(tmp_path / "exp.py"))
    assert config.name == "y"


def test_a_failing_config_file_is_named_with_its_line(tmp_path):
    from expint_jax.config import parse_command_line

    (tmp_path / "broken.py").write_text("def get_config():\n    return {}['missing']\n")
    with pytest.raises(ConfigError, match=r"^config file .*broken\.py:2: KeyError: 'missing'$"):
        parse_command_line("expint test", [f"--config={tmp_path / 'broken.py'}"], tmp_path / "broken.py")
    with pytest.raises(ConfigError, match=r"^config file /nonexistent\.py does not exist$"):
        parse_command_line("expint test", ["--config=/nonexistent.py"], tmp_path / "broken.py")


def test_format_config_lists_every_field():
    from expint_jax.config import format_config

    text = format_config(Run("demo", distill=Distill(stop=("a",))))
    assert text.splitlines() == ["config.name = 'demo'", "config.iterations = 3", "config.distill.regime = 'off_policy'",
                                 "config.distill.optimizer.learning_rate = 1e-05",
                                 "config.distill.optimizer.warmup_steps = 0", "config.distill.stop = ['a']",
                                 "config.distill.checkpoint = None"]


def test_one_line_joins_a_message():
    from expint_jax.config import one_line

    assert one_line("ckpt: does not match:\nmissing a\n\n  shape b\n") == "ckpt: does not match: missing a; shape b"
