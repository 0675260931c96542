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
