"""A policy checkpoint served by an inference engine (vLLM, SGLang, ``expint_jax.llm.serve``) for as long as a caller needs it.

Contract:
  * ``ServerSpec.command`` is a template, split like a shell line (``shlex``; no shell runs it),
    each argument then filled in with ``{checkpoint}`` (the Hugging Face directory to serve),
    ``{port}``, ``{host}``, ``{model_name}`` (the name the server lists and requests use) and
    ``{python}`` (this interpreter). ``check_command(template)`` raises ``ValueError`` for an
    unknown placeholder, a missing ``{checkpoint}`` or ``{port}``, or a line that does not split.
  * ``PolicyServer(spec, checkpoint, log_path)`` is a context manager. Entering starts the command
    in a process group of its own (``port`` 0: a free port is picked first), its stdout and stderr
    appended to ``log_path``, and waits until ``GET <url>/v1/models`` answers and lists
    ``model_name``. On Linux the server also receives SIGTERM when the thread that started it
    dies, so a killed run leaves no server holding the accelerators.
  * A server that exits during start-up, does not answer within ``startup_timeout_s``, or lists
    other models is stopped, and ``ServerError`` names the command, the URL, what failed and the
    last lines of the log.
  * Health: ``check()`` raises ``ServerError`` when the process has exited or ``/v1/models`` does
    not answer. With ``health_interval_s > 0`` a background thread checks that often and keeps the
    first failure, which the next request raises.
  * ``backend()``: an ``OpenAICompatible`` client of the server that raises ``ServerError`` when a
    request still fails after the client's retries (naming a dead or silent server as such)
    instead of handing error completions to the agent: rollouts a broken server spoiled are never
    written. With ``count_tokens`` the agent budgets its context with the served model's tokenizer.
  * Exiting: SIGTERM to the process group, SIGKILL after ``shutdown_grace_s``, then SIGKILL to
    whatever is left of the group; the exit status is appended to the log.
  * API keys: the client reads the key from the variable ``api_key_env`` names and sends it only
    in the ``Authorization`` header; it is redacted from every message (``llm.http.redact``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from expint_jax.llm.base import BackendError, SamplingSpec
from expint_jax.llm.http import HttpError, RetryPolicy, redact, request_json
from expint_jax.llm.openai import OpenAICompatible
from expint_jax.records import Completion, Message

log = logging.getLogger(__name__)

PLACEHOLDERS = ("checkpoint", "port", "host", "model_name", "python")
REQUIRED = ("checkpoint", "port")
LOG_TAIL_LINES = 20

# Runs in the server's process before the command: asks Linux to send SIGTERM when the thread that
# started it dies (PR_SET_PDEATHSIG = 1), then becomes the command (exec keeps the pid and the setting).
_LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    sys.exit("the process that started this server is gone")
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.exit(f"cannot run {sys.argv[2]!r}: {e.strerror}")
"""


class ServerError(BackendError):
    """The policy server did not start, died, or stopped answering; the message names the command,
    the URL, what failed and the end of the server's log."""


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """How to serve a checkpoint and talk to the server (see the module docstring)."""

    command: str = "vllm serve {checkpoint} --host {host} --port {port} --served-model-name {model_name}"
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, picked at each start
    model_name: str = "policy"
    env: tuple[str, ...] = ()  # "NAME=VALUE" for the server process only (e.g. CUDA_VISIBLE_DEVICES=4,5,6,7)
    api_key_env: str = ""  # the variable holding the server's API key ("" = none)
    startup_timeout_s: float = 900.0  # loading a large model and capturing CUDA graphs takes minutes
    health_interval_s: float = 30.0  # 0: check only when a request fails
    health_timeout_s: float = 10.0
    shutdown_grace_s: float = 30.0  # after SIGTERM, before SIGKILL
    max_concurrency: int = 64  # requests in flight; the engine batches them
    max_attempts: int = 3  # per request, with back-off; then the caller fails
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.model_name or not self.host:
            raise ValueError("host and model_name must be non-empty")
        for name in ("startup_timeout_s", "health_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.health_interval_s < 0 or self.shutdown_grace_s < 0:
            raise ValueError("health_interval_s and shutdown_grace_s must be >= 0")
        if self.max_concurrency < 1 or self.max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be >= 1")
        bad = [item for item in self.env if "=" not in item or not item.split("=", 1)[0].isidentifier()]
        if bad:
            raise ValueError(f"env entries must be NAME=VALUE, got {bad}")


def check_command(template: str) -> None:
    """Raises ``ValueError`` saying what is wrong with a command template (module docstring)."""
    try:
        arguments = shlex.split(template)
    except ValueError as e:
        raise ValueError(f"does not split into arguments ({e})") from None
    if not arguments:
        raise ValueError("is empty")
    found: set[str] = set()
    for argument in arguments:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(argument) if name is not None]
        except ValueError as e:
            raise ValueError(f"argument {argument!r}: {e} (write a literal brace as {{{{ or }}}})") from None
        unknown = [name for name in fields if name not in PLACEHOLDERS]
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; the placeholders are "
                             + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        found.update(fields)
    missing = [name for name in REQUIRED if name not in found]
    if missing:
        raise ValueError(f"needs {' and '.join(f'{{{m}}}' for m in missing)} (the server must load the "
                         "checkpoint given and listen on the port given)")


def render_command(template: str, *, checkpoint: str | Path, port: int, host: str, model_name: str) -> list[str]:
    """The command's arguments with every placeholder filled in."""
    check_command(template)
    values = {"checkpoint": str(checkpoint), "port": port, "host": host, "model_name": model_name,
              "python": sys.executable}
    return [argument.format(**values) for argument in shlex.split(template)]


def free_port(host: str) -> int:
    """A port nothing listens on now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_bytes()[-16_384:].decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class PolicyServer(contextlib.AbstractContextManager):
    """One server process for one checkpoint; see the module docstring."""

    def __init__(self, spec: ServerSpec, checkpoint: str | Path, log_path: str | Path):
        check_command(spec.command)
        self.spec = spec
        self.checkpoint = Path(checkpoint)
        self.log_path = Path(log_path)
        self.port = spec.port
        self._api_key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        if spec.api_key_env and not self._api_key:
            raise ServerError(f"policy server: environment variable {spec.api_key_env} (api_key_env) is not set")
        self._process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._failure: ServerError | None = None
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.arguments: list[str] = []

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        """The server's root URL (``/v1`` included), reachable from this process."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.spec.host, self.spec.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    @property
    def command(self) -> str:
        return redact(shlex.join(self.arguments), self._secrets)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def _secrets(self) -> tuple[str, ...]:
        return (self._api_key,) if self._api_key else ()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> PolicyServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> PolicyServer:
        if self._process is not None:
            raise RuntimeError("PolicyServer.start: already started")
        spec = self.spec
        self._stop.clear()
        self._failure = None
        if not (self.checkpoint / "config.json").is_file():
            raise ServerError(f"policy server: {self.checkpoint} is not a Hugging Face checkpoint (no config.json)")
        self.port = spec.port or free_port(spec.host)
        self.arguments = render_command(spec.command, checkpoint=self.checkpoint, port=self.port, host=spec.host,
                                        model_name=spec.model_name)
        env = {**os.environ, **dict(item.split("=", 1) for item in spec.env)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self._note(f"starting: {self.command}")
        launch = ([sys.executable, "-c", _LAUNCHER, str(os.getpid())] if sys.platform.startswith("linux") else [])
        try:
            self._process = subprocess.Popen(launch + self.arguments, stdin=subprocess.DEVNULL, stdout=self._log,
                                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            self._close_log()
            raise ServerError(f"policy server `{self.command}`: cannot start it: {e}") from None
        self._note(f"pid {self._process.pid}")
        log.info("policy server: started `%s` (pid %d, log %s)", self.command, self._process.pid, self.log_path)
        try:
            self._wait_until_ready()
        except BaseException:  # a failed start, or an interrupt while waiting: no server is left behind
            self.stop()
            raise
        if spec.health_interval_s > 0:
            self._monitor = threading.Thread(target=self._watch, name="policy-server-health", daemon=True)
            self._monitor.start()
        return self

    def _wait_until_ready(self) -> None:
        started = time.monotonic()
        deadline = started + self.spec.startup_timeout_s
        last_error, pause = "no answer yet", 0.1
        while True:
            code = self._process.poll()
            if code is not None:
                raise self.error(f"exited with code {code} before it answered GET {self.url}/models")
            try:
                models = self._listed_models(timeout_s=max(min(5.0, deadline - time.monotonic()), 0.1))
            except HttpError as e:
                last_error = str(e)
            else:
                if self.spec.model_name in models:
                    break
                raise self.error(f"lists the models {models}, not {self.spec.model_name!r}; does the command pass "
                                 "{model_name} (vLLM and SGLang: --served-model-name {model_name})?")
            if time.monotonic() >= deadline:
                raise self.error(f"did not answer GET {self.url}/models within {self.spec.startup_timeout_s:g} s "
                                 f"(config startup_timeout_s; last: {last_error})")
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 2, 2.0)
        self._note(f"ready at {self.url} after {time.monotonic() - started:.1f} s")
        log.info("policy server: ready at %s after %.1f s", self.url, time.monotonic() - started)

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period; safe to call twice."""
        self._stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join()
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(self.spec.shutdown_grace_s)
            except subprocess.TimeoutExpired:
                self._note(f"no exit {self.spec.shutdown_grace_s:g} s after SIGTERM: SIGKILL")
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        _signal_group(process.pid, signal.SIGKILL)  # children the server left behind
        self._note(f"stopped (exit code {process.returncode})")
        log.info("policy server: stopped `%s` (exit code %s)", self.command, process.returncode)
        self._close_log()

    # ------------------------------------------------------------------ health

    def check(self) -> None:
        """Raises ``ServerError`` when the server has exited or ``/v1/models`` does not answer."""
        process = self._process
        if process is None:
            raise self.error("is not running (stopped, or never started)")
        code = process.poll()
        if code is not None:
            raise self.error(f"exited with code {code}")
        try:
            self._listed_models(timeout_s=self.spec.health_timeout_s, attempts=2)
        except HttpError as e:
            raise self.error(f"does not answer its health check: {e}") from None

    def raise_if_failed(self) -> None:
        """Raises the failure a health check found (the background one, or the process exit)."""
        if self._failure is not None:
            raise self._failure
        if self._process is None or self._process.poll() is not None:
            self.check()

    def _watch(self) -> None:
        while not self._stop.wait(self.spec.health_interval_s):
            try:
                self.check()
            except ServerError as e:
                if self._stop.is_set():
                    return
                self._failure = e
                log.error("%s", e)
                return

    def _listed_models(self, *, timeout_s: float, attempts: int = 1) -> list[str]:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        body = request_json("GET", f"{self.url}/models", headers=headers, secrets=self._secrets,
                            policy=RetryPolicy(max_attempts=attempts, timeout_s=timeout_s, backoff_s=0.5))
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise HttpError(f"GET {self.url}/models: no 'data' list in the answer")
        return [str(m.get("id")) for m in data if isinstance(m, dict)]

    # ------------------------------------------------------------------ client

    def backend(self, count_tokens: Callable[[Sequence[Message]], int] | None = None, *,
                enable_thinking: bool | None = None) -> ServedBackend:
        """``enable_thinking``: sent as the chat template's switch (``OpenAICompatible``); None: nothing."""
        spec = self.spec
        client = OpenAICompatible(self.url, spec.model_name, api_key_env=spec.api_key_env or None,
                                  max_concurrency=spec.max_concurrency,
                                  retry=RetryPolicy(max_attempts=spec.max_attempts, timeout_s=spec.request_timeout_s),
                                  enable_thinking=enable_thinking)
        return ServedBackend(self, client, count_tokens)

    # ------------------------------------------------------------------ messages

    def error(self, what: str) -> ServerError:
        """A ``ServerError`` saying ``what`` happened, with the command, URL and log tail."""
        tail = log_tail(self.log_path)
        return ServerError(redact(f"policy server `{self.command}` at {self.url} {what}; last lines of "
                                  f"{self.log_path}:\n{tail}", self._secrets))

    def _note(self, text: str) -> None:
        if self._log is not None:
            self._log.write(f"[expint {time.strftime('%Y-%m-%d %H:%M:%S')}] {text}\n".encode())
            self._log.flush()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class ServedBackend:
    """A ``ChatBackend`` over a ``PolicyServer``: failures raise ``ServerError`` (module docstring)."""

    def __init__(self, server: PolicyServer, client: OpenAICompatible,
                 count_tokens: Callable[[Sequence[Message]], int] | None = None):
        self.server, self.client = server, client
        if count_tokens is not None:  # the agent looks for the attribute
            self.count_tokens = count_tokens

    def chat(self, conversations: Sequence[Sequence[Message]], params: SamplingSpec) -> list[Completion]:
        self.server.raise_if_failed()
        completions = self.client.chat(conversations, params)
        failed = [c for c in completions if c.finish_reason == "error"]
        if failed:
            self.server.check()  # a dead or silent server is reported as such
            raise self.server.error(f"failed {len(failed)} of {len(completions)} requests after "
                                     f"{self.client.retry.max_attempts} attempts each; first error: {failed[0].error}")
        return completions


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
