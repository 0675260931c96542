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
``ConfigError`` whose one-line message names the flag or key (an unknown key by its full path).
``format_config`` lists every field of a bound config as ``config.<path> = value`` (``--show-config``);
``one_line`` flattens any error message onto one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import traceback
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


def load_config_file(path: str | Path, argument: str | None = None) -> Any:
    """Imports ``path`` and returns its ``get_config()`` (the ``ConfigDict`` it builds), called with
    ``argument`` when given (``--config=FILE:ARGUMENT``). A missing file, a file without
    ``get_config`` or an exception inside it is a ``ConfigError`` naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else f"config file {path} is not a file")
    spec = importlib.util.spec_from_file_location(f"expint_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} defines no get_config()")
        return module.get_config(argument) if argument is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # the user's Python: say where it failed, not how we called it
        raise ConfigError(f"config file {_where_in(path, e)}: {type(e).__name__}: {one_line(e)}") from e


def _where_in(path: Path, error: BaseException) -> str:
    """``path:line`` of the innermost frame of ``error`` inside ``path`` (or of a syntax error there)."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f"{path}:{error.lineno}"
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if Path(frame.filename).resolve() == path.resolve()]
    return f"{path}:{lines[-1]}" if lines else str(path)


def parse_command_line(command: str, argv: Sequence[str], default_config: str | Path) -> Any:
    """The ``ConfigDict`` of ``--config=FILE`` (default ``default_config``) with the command line's
    ``--config.<key>=value`` overrides applied; the file's ``get_config()`` must lock its dict so
    that an override of a key it does not define is refused.

    ``--config`` may come anywhere on the line (absl wants it before its overrides; it is moved
    there). Raises ``ConfigError`` with a one-line message: an unknown flag; an override of a key
    the config does not have (``config.data.demo.granularity: unknown key; valid keys at
    config.data.demo: ...``); a value that does not parse; a missing or failing config file.
    ``command`` names the program in flag errors."""
    from absl import flags
    from ml_collections import config_flags

    argv = _config_file_first(list(argv))
    if not argv or not (argv[0] == "--config" or argv[0].startswith("--config=")):
        argv = [f"--config={default_config}", *argv]
    _check_override_keys(argv)
    command_line = [command, *argv]
    flag_values = flags.FlagValues()
    # config_flags reads the --config.<field> overrides from sys_argv, not from the parsed list.
    config_flags.DEFINE_config_file("config", str(default_config), "experiment config file", flag_values=flag_values,
                                    lock_config=True, sys_argv=command_line)
    try:
        flag_values(command_line)
        return flag_values.config
    except flags.Error as e:
        raise ConfigError(one_line(e)) from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections rejecting an override
        detail: object = e
        while isinstance(detail, BaseException) and detail.args:  # unwrap AttributeError(KeyError(text))
            detail = detail.args[0]
        raise ConfigError(f"bad configuration override: {one_line(detail)}") from None


def _config_file_first(argv: list[str]) -> list[str]:
    """``argv`` with its ``--config=FILE`` (or ``--config FILE``) moved to the front."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return [arg, *argv[:i], *argv[i + 1:]]
        if arg == "--config":
            if i + 1 == len(argv):
                raise ConfigError("--config needs a value: --config=configs/<name>.py")
            return [f"--config={argv[i + 1]}", *argv[:i], *argv[i + 2:]]
    return argv


def _check_override_keys(argv: list[str]) -> None:
    """The config file loads (else a ``ConfigError`` naming it, and the line that failed), and every
    ``--config.<path>`` names a key of the config file: else a ``ConfigError`` naming the
    full path, the section where it stops matching and that section's keys (ml_collections would
    only name the last component)."""
    overrides = [arg[len("--config."):].split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
    file, _, argument = argv[0][len("--config="):].partition(":")
    if argument and not Path(file).is_file():  # a path with a colon in it, not FILE:ARGUMENT
        file, argument = argv[0][len("--config="):], ""
    root = load_config_file(file, argument or None)
    for override in overrides:
        if "[" in override:  # an indexed element (a.b[0]): ml_collections checks those itself
            continue
        node, where = root, "config"
        for name in override.split("."):
            keys = _section_keys(node)
            if keys is None:
                raise ConfigError(f"config.{override}: {where} is not a section (it holds {_plain(node)!r})")
            if name not in keys:
                close = difflib.get_close_matches(name, keys, n=1)
                hint = f" (did you mean {where}.{close[0]}?)" if close else ""
                raise ConfigError(f"config.{override}: unknown key{hint}; valid keys at {where}: {', '.join(sorted(keys))}")
            node, where = node[name], f"{where}.{name}"


def _section_keys(node: Any) -> list[str] | None:
    if isinstance(node, Mapping) or (hasattr(node, "keys") and hasattr(node, "__getitem__")):
        return [str(k) for k in node.keys()]
    return None


def one_line(detail: object) -> str:
    """A message on one line (a user error is one line on the terminal): its lines joined by "; ",
    or by a space after a line that ends in a colon (a heading of what follows)."""
    out = ""
    for line in (" ".join(raw.split()) for raw in str(detail).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def format_config(config: Any, prefix: str = "config") -> str:
    """Every field of a bound configuration, one ``config.<path> = <value>`` line each (``--show-config``):
    the lines name the keys exactly as ``--config.<path>=...`` overrides them."""
    def lines(value: Any, path: str) -> list[str]:
        if isinstance(value, Mapping) and value:
            return [line for key, item in value.items() for line in lines(item, f"{path}.{key}")]
        return [f"{path} = {value!r}"]  # Python literals, as overrides are written

    return "\n".join(lines(to_dict(config), prefix))


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
