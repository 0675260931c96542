"""Host work done once under multi-controller JAX: process 0 does it, the others wait for its outcome.

Several processes run the same program (``jax.distributed``, one per host). Device work is
collective: every process enters each jitted step over the global mesh. Host work with side
effects (rollouts against tools and endpoints, file writes) must happen once, so
``Processes.leader_runs(name, work)`` runs ``work`` on process 0 only and hands its JSON-ready
result, or its failure, to every other process through the coordination service's key-value
store (the one ``jax.distributed.initialize`` started). No other process recomputes it.

Contract:
  * Every process makes the same sequence of ``leader_runs`` calls with the same names; a call is
    keyed by its place in that sequence and its name. ``work`` must not enter a collective (only
    process 0 runs it).
  * Process 0 announces the call (``<key>/started``, and ``expint/at`` says where it is), runs
    ``work``, and stores ``{"value": result}``, or, when ``work`` raises, ``{"error": "Type: message"}``
    before raising it again.
  * Any other process logs what it waits for, then waits for the announcement at most
    ``start_timeout_s`` (process 0 reaches the same call soon after the previous one: a longer
    silence means the processes took different paths or process 0 hangs between calls) and for
    the outcome at most ``timeout_s``. A missed deadline raises ``WaitTimeout`` naming this process,
    the call, and the call process 0 announced last; a failed call raises ``LeaderFailed`` with
    process 0's error on one line. If process 0 dies instead, JAX's coordination service ends
    the other processes (heartbeat), and the line each logged says what it was waiting for.
  * One process: ``leader_runs(name, work)`` is ``work()``, nothing else.

Deadlines: ``EXPINT_WAIT_TIMEOUT_S`` (default 86400 s: one stage of process 0, e.g. a long
rollout stage, may take that long) and ``EXPINT_START_TIMEOUT_S`` (default 600 s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_VARIABLE = "EXPINT_WAIT_TIMEOUT_S"
START_TIMEOUT_VARIABLE = "EXPINT_START_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600.0
DEFAULT_START_TIMEOUT_S = 600.0
_POLL_S = 5.0  # a blocking wait returns this often, so that Ctrl-C is seen
_AT = "expint/at"


class LeaderFailed(RuntimeError):
    """Process 0 failed at a call the other processes were waiting for; its error is in the message."""


class WaitTimeout(RuntimeError):
    """A process waited longer than its deadline for process 0."""


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"environment variable {name}={value!r} must be positive")
    return seconds


def _client() -> Any:
    # JAX has no public accessor for the coordination client; multihost_utils and orbax read the same.
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("several JAX processes but no coordination client: call jax.distributed.initialize first "
                           "(expint_jax.parallel.distributed.initialize)")
    return client


@dataclasses.dataclass
class Processes:
    """This process's place among the JAX processes, and the waits for process 0's host work."""

    index: int = 0
    count: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    client: Any = None  # the coordination service's client (several processes only)
    calls: int = 0  # leader_runs calls made so far

    @property
    def is_leader(self) -> bool:
        return self.index == 0

    def leader_runs(self, name: str, work: Callable[[], T]) -> T:
        """``work()`` on process 0; its result (JSON-ready) on every process. See the module docstring."""
        if self.count == 1:
            return work()
        self.calls += 1
        key = f"expint/{self.calls:05d}/{name}"
        if self.is_leader:
            self.client.key_value_set(_AT, f"{name!r} (call {self.calls})", allow_overwrite=True)
            self.client.key_value_set(f"{key}/started", "")
            try:
                value = work()
                outcome = json.dumps({"value": value})  # a result that cannot be sent is process 0's failure too
            except BaseException as error:
                self.client.key_value_set(f"{key}/outcome", json.dumps({"error": f"{type(error).__name__}: {error}"}))
                raise
            self.client.key_value_set(f"{key}/outcome", outcome)
            return value
        log.info("process %d of %d: waiting for process 0 to finish %s (call %d)", self.index, self.count, name,
                 self.calls)
        self._get(f"{key}/started", self.start_timeout_s, START_TIMEOUT_VARIABLE, name, "to reach")
        outcome = json.loads(self._get(f"{key}/outcome", self.timeout_s, TIMEOUT_VARIABLE, name, "to finish"))
        if "error" in outcome:
            raise LeaderFailed(f"process {self.index}: process 0 failed at {name}: {outcome['error']}")
        return outcome["value"]

    def _get(self, key: str, timeout_s: float, variable: str, name: str, verb: str) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                return self.client.blocking_key_value_get(key, max(1, int(min(left, _POLL_S) * 1000)))
            except Exception as error:  # jax.errors.JaxRuntimeError; a timeout says DEADLINE_EXCEEDED
                if "DEADLINE_EXCEEDED" not in str(error):
                    raise LeaderFailed(f"process {self.index}: lost the coordination service while waiting for "
                                       f"process 0 {verb} {name}: {error}") from None
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"process {self.index}: waited {timeout_s:.0f} s for process 0 {verb} {name} "
                                  f"(call {self.calls}); process 0 last announced {self._leader_at()}. Raise {variable} if its "
                                  "work is just slow; otherwise the processes ran different code paths")

    def _leader_at(self) -> str:
        try:
            return self.client.key_value_try_get(_AT)
        except Exception:  # NOT_FOUND: process 0 announced nothing yet
            return "nothing yet"


_CURRENT: Processes | None = None


def current() -> Processes:
    """This process's ``Processes`` (one per Python process, so every caller shares the call sequence)."""
    global _CURRENT
    import jax

    count = jax.process_count()
    if _CURRENT is None or _CURRENT.count != count:
        _CURRENT = Processes(jax.process_index(), count, _seconds(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S),
                             _seconds(START_TIMEOUT_VARIABLE, DEFAULT_START_TIMEOUT_S),
                             _client() if count > 1 else None)
    return _CURRENT
