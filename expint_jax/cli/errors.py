"""Which exceptions are the user's to fix, and how a command reports them.

Contract: an *expected user error* (a bad config key or value, a missing or corrupt file, a
malformed record, a checkpoint that does not fit, a stale output directory, an unreachable
endpoint, a mesh the devices cannot form) ends a command with one line on stderr,
``expint <command>: <what and where>``, and exit status 2. Anything else is a bug and keeps its
traceback. ``--debug`` on any command (or ``EXPINT_DEBUG=1``) keeps the traceback of user
errors too.

The error classes are named, not imported: importing them would import JAX and the model code
into every command. An error whose module was never imported cannot have been raised, so a
look-up by qualified name over the exception's class hierarchy is exact.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

DEBUG_FLAG = "--debug"
DEBUG_ENV = "EXPINT_DEBUG"

USER_ERRORS = frozenset({
    "expint_jax.config.ConfigError",
    "expint_jax.models.config.ConfigError",
    "expint_jax.models.hf.CheckpointError",
    "expint_jax.models.tokenizer.TokenizerBuildError",
    "expint_jax.records.RecordError",
    "expint_jax.experience.bank.PoolError",
    "expint_jax.experience.release_format.ReleaseFormatError",
    "expint_jax.distill.run.StaleOutputError",
    "expint_jax.distill.run.InputError",
    "expint_jax.loop.layout.StaleStageError",
    "expint_jax.loop.stages.EndpointError",
    "expint_jax.parallel.coordination.LeaderFailed",
    "expint_jax.parallel.coordination.WaitTimeout",
    "expint_jax.rollout.envs.web.WebToolConfigError",
    "expint_jax.llm.base.BackendError",
    "expint_jax.llm.http.HttpError",
    "json.decoder.JSONDecodeError",
    "builtins.FileNotFoundError",
    "builtins.FileExistsError",
    "builtins.IsADirectoryError",
    "builtins.NotADirectoryError",
    "builtins.PermissionError",
})


def is_user_error(error: BaseException) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERRORS for cls in type(error).__mro__)


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def take_debug_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug``; its presence turns debugging on for this process (and children)."""
    if DEBUG_FLAG in argv:
        os.environ[DEBUG_ENV] = "1"
    return [arg for arg in argv if arg != DEBUG_FLAG]


def one_line(error: BaseException) -> str:
    """The error's message on one line; an ``OSError`` as ``<file>: <reason>`` (its ``str`` puts
    ``[Errno 2]`` first)."""
    from expint_jax.config import one_line as flatten  # light: no JAX behind it

    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return flatten(f"{error.filename}: {error.strerror}")
    return flatten(error) or type(error).__name__


def report(command: str, error: BaseException) -> int:
    """Prints ``command: <error>`` and returns exit status 2 for a user error; re-raises a bug,
    and any error when debugging. Call it from an ``except`` block."""
    if debug_requested() or not is_user_error(error):
        raise error
    print(f"{command}: {one_line(error)}", file=sys.stderr)
    return 2


def refuse(command: str, error: BaseException) -> int:
    """For an error a command knows is the user's (it caught it around its own checks, e.g. a
    ``ValueError`` of its option parsing): one line and status 2, re-raised when debugging."""
    if debug_requested():
        raise error
    print(f"{command}: {one_line(error)}", file=sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with its errors on one line, like every other user error (``prog: message;
    see --help``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)
