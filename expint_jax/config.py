"""Typed configuration: an ``ml_collections.ConfigDict`` validated once into frozen dataclasses.

Experiments are Python files (``configs/<name>.py``) whose ``get_config()`` returns a locked
``ConfigDict``; the command line overrides fields (``--config.distill.optimizer.learning_rate=3e-5``).
``bind(RunConfig, config)`` then checks the whole tree against the dataclass schema:

  * an unknown key is an error naming its full path and the keys that exist there;
  * a value of the wrong type is an error naming the path, the expected and the given type
    (ints are accepted where floats are expected; lists become tuples);
  * ``Literal`` fields accept only their listed values; nested dataclasses recurse; a field with
    no default must be present;
  * each dataclass's own ``__post_init__`` validation runs, and its error is prefixed with the path.
``to_dict`` turns a bound config back into plain data (stored beside every run for provenance).
``parse_command_line`` reads ``--config=FILE`` and its ``--config.<key>=value`` overrides into a
``ConfigDict``; every mistake it meets (unknown flag, bad override, missing file) is a
``ConfigError`` whose one-line message names the flag or key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that does not fit the schema; the message names the key path."""


def _plain(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) and not dataclasses.is_dataclass(value) else value


def bind(cls: type[T], data: Any, path: str = "config") -> T:
    """Builds the dataclass ``cls`` from a mapping (or ``ConfigDict``), validating every key."""
    data = _plain(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a section (mapping), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(k) for k in unknown)}; valid keys: {', '.join(sorted(fields))}")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], f"{path}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}.{name}: required key is missing")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return _plain(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else bind(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} entries, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))) if args else tuple(value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        value = _plain(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint in (int, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise ConfigError(f"{path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def to_dict(config: Any) -> Any:
    """Plain nested dicts/lists of a bound configuration."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def load_config_file(path: str | Path) -> Any:
    """Imports ``path`` and returns its ``get_config()`` (the ``ConfigDict`` it builds)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"expint_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module.get_config()


def parse_command_line(command: str, argv: Sequence[str], default_config: str | Path) -> Any:
    """The ``ConfigDict`` of ``--config=FILE`` (default ``default_config``) with the command line's
    ``--config.<key>=value`` overrides applied; the file's ``get_config()`` must lock its dict so
    that an override of a key it does not define is refused.

    Raises ``ConfigError`` with a one-line message (an unknown flag, an override of a missing key,
    a value that does not parse, a missing file); ``command`` names the program in flag errors."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = [f"--config={default_config}", *argv]
    command_line = [command, *argv]
    flag_values = flags.FlagValues()
    # config_flags reads the --config.<field> overrides from sys_argv, not from the parsed list.
    config_flags.DEFINE_config_file("config", str(default_config), "experiment config file", flag_values=flag_values,
                                    lock_config=True, sys_argv=command_line)
    try:
        flag_values(command_line)
        return flag_values.config
    except flags.Error as e:
        raise ConfigError(_one_line(e)) from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections rejecting an override
        detail: object = e
        while isinstance(detail, BaseException) and detail.args:  # unwrap AttributeError(KeyError(text))
            detail = detail.args[0]
        raise ConfigError(f"bad configuration override: {_one_line(detail)}") from None


def _one_line(detail: object) -> str:
    return " ".join(str(detail).split())


def config_dict(cls: type, **required: Any) -> Any:
    """A locked ``ConfigDict`` holding the defaults of the dataclass schema ``cls`` (``required``
    gives fields without a default), so config files start from the schema's own defaults and set
    only what differs. Optional fields whose default is None become typed placeholders, so a
    command-line override still parses to the right type."""
    import ml_collections
    from ml_collections import config_dict as cd

    def build(schema: type, values: Mapping[str, Any]) -> Any:
        hints = typing.get_type_hints(schema)
        out = ml_collections.ConfigDict()
        for field in dataclasses.fields(schema):
            if not field.init:
                continue
            if field.name in values:
                value = values[field.name]
            elif field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                raise ConfigError(f"config_dict({schema.__name__}): give the required field {field.name!r}")
            hint = hints[field.name]
            if dataclasses.is_dataclass(value):
                out[field.name] = build(type(value), {f.name: getattr(value, f.name)
                                                      for f in dataclasses.fields(value) if f.init})
            elif value is None:
                options = [a for a in typing.get_args(hint) if a is not type(None)]
                out[field.name] = cd.placeholder(options[0] if len(options) == 1 else object)
            else:
                out[field.name] = value
        return out

    result = build(cls, required)
    result.lock()
    return result
