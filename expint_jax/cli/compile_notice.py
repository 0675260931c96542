"""Say when XLA is compiling, so a silent minute before the first step is explained.

``with announced_compiles():`` watches JAX's own compile log records: when a compilation has run
for ``after_s`` seconds, one line says so (``compiling jit(train_step) with XLA (first call; ...)``),
and when it ends, another gives its time. Compilations shorter than ``after_s`` print nothing, so
the many small ones stay silent and a cache hit (``xla_cache``) is not announced at all.

It reads two of JAX's debug records (``Compiling <fun> ...`` from ``jax._src.interpreters.pxla``,
``Finished XLA compilation of <fun> in <t> sec`` from ``jax._src.dispatch``): if a JAX version
renames them, the notices stop and nothing else changes. Those loggers are set to DEBUG inside the
block; their records do not propagate then, and the ones at WARNING or above go on to the root logger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterator

_COMPILE_LOGGERS = ("jax._src.interpreters.pxla", "jax._src.dispatch")
_FINISHED = re.compile(r"^Finished XLA compilation of (?P<fun>.+) in (?P<seconds>[0-9.eE+-]+) sec$")


@dataclasses.dataclass
class _Pending:
    timer: threading.Timer
    announced: threading.Event


class CompileNotices(logging.Handler):
    """The handler ``announced_compiles`` installs."""

    def __init__(self, after_s: float, echo: Callable[[str], None]):
        super().__init__(logging.DEBUG)
        self.after_s, self.echo = after_s, echo
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            logging.getLogger().handle(record)
        if isinstance(record.msg, str) and record.msg.startswith("Compiling ") and record.args:
            self._started(str(record.args[0]))
        elif isinstance(record.msg, str) and "XLA compilation" in record.msg:
            match = _FINISHED.match(record.getMessage())
            if match:
                self._finished(match["fun"], float(match["seconds"]))

    def _started(self, fun: str) -> None:
        announced = threading.Event()

        def announce() -> None:
            announced.set()
            self.echo(f"compiling {fun} with XLA (first call; this can take minutes on CPU, and the result is "
                      "cached for later runs)...")

        timer = threading.Timer(self.after_s, announce)
        timer.daemon = True
        with self._lock:
            self._pending[fun] = _Pending(timer, announced)
        timer.start()

    def _finished(self, fun: str, seconds: float) -> None:
        with self._lock:
            pending = self._pending.pop(fun, None)
        if pending is None:
            return
        pending.timer.cancel()
        if pending.announced.is_set():
            self.echo(f"compiled {fun} in {seconds:.0f} s")

    def cancel_pending(self) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for item in pending:
            item.timer.cancel()


@contextlib.contextmanager
def announced_compiles(after_s: float = 5.0, echo: Callable[[str], None] | None = None) -> Iterator[CompileNotices]:
    """Compile notices while the block runs; ``echo`` defaults to printing with a flush. JAX's
    loggers are restored afterwards (their level and propagation), and pending notices dropped."""
    notices = CompileNotices(after_s, echo or (lambda line: print(line, flush=True)))
    loggers = [logging.getLogger(name) for name in _COMPILE_LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(notices)
    try:
        yield notices
    finally:
        for logger, (level, propagate) in zip(loggers, saved):
            logger.removeHandler(notices)
            logger.setLevel(level)
            logger.propagate = propagate
        notices.cancel_pending()
