"""Training metrics on disk: one JSONL file per split and TensorBoard event files (tensorboardX).

Contract:
  * ``MetricsLog(directory, resume_step=k)`` writes ``<directory>/<split>.jsonl`` (e.g.
    ``train.jsonl``, ``eval.jsonl``), one row ``{"step": int, ...float metrics}`` per logged step,
    and TensorBoard scalars ``<split>/<name>`` under ``<directory>/tensorboard/``.
  * Resume without duplicates: rows of steps after ``k`` (logged by a run killed after its last
    checkpoint) are removed from every JSONL file in one atomic rewrite per file, and TensorBoard
    is told to purge its events from step ``k + 1`` on (``purge_step``).
  * A kill can leave a partial last line; it is dropped when the file is truncated. A malformed
    line anywhere else is an error naming file:line.
  * JSONL rows and TensorBoard events are flushed as they are written (events are written
    synchronously, not through tensorboardX's writer thread), so everything a checkpoint covers
    is on disk when it is saved, also for a process killed right after.
  * ``enabled=False`` (every process but 0) writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from expint_jax import storage

log = logging.getLogger(__name__)


def read_metrics(path: str | Path, *, allow_partial_last_line: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics JSONL file; with ``allow_partial_last_line`` a torn last line is dropped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if allow_partial_last_line and lineno == len(lines):
                log.warning("%s:%d: dropping a partial last line (a killed run was writing it)", path, lineno)
                continue
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{lineno}: a metrics row must be an object with an integer 'step'")
        rows.append(row)
    return rows


def truncate_after(path: str | Path, step: int) -> None:
    """Atomically keeps only the rows of ``path`` whose step is at most ``step``."""
    rows = read_metrics(path, allow_partial_last_line=True)
    storage.write_jsonl(path, [row for row in rows if row["step"] <= step])


class _EventFile:
    """A TensorBoard event file written synchronously: each call's events are on disk when it returns.
    Starts with the session-start event at ``purge_step`` that tells TensorBoard to drop the events
    an earlier (killed) writer logged from that step on, as ``SummaryWriter(purge_step=...)`` does."""

    def __init__(self, directory: Path, *, purge_step: int, suffix: str):
        from tensorboardX.event_file_writer import EventsWriter  # imported here: only process 0 needs it
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        directory.mkdir(parents=True, exist_ok=True)
        self._event = Event
        self._events = EventsWriter(str(directory / "events"), suffix)
        self._events.write_event(Event(step=purge_step, file_version="brain.Event:2"))
        self._events.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self._events.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboardX.summary import scalar

        now = time.time()
        for tag, value in values.items():
            self._events.write_event(self._event(summary=scalar(tag, value), step=step, wall_time=now))
        self._events.flush()

    def close(self) -> None:
        self._events.close()


class MetricsLog:
    """Appends metrics rows to JSONL files and TensorBoard; see the module docstring."""

    def __init__(self, directory: str | Path, *, resume_step: int = 0, enabled: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled
        self._files: dict[str, IO[str]] = {}
        self._writer = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.glob("*.jsonl")):
            truncate_after(path, resume_step)
        # tensorboardX names event files by the second and opens them with "wb": a unique suffix
        # keeps a quickly restarted run from overwriting the killed run's events.
        self._writer = _EventFile(self.directory / "tensorboard", purge_step=resume_step + 1,
                                  suffix=f".{os.getpid()}.{time.time_ns()}")

    def write(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError(f"metrics for split {split!r} at step {step} must not carry their own 'step' key")
        values = {name: float(value) for name, value in metrics.items()}
        if split not in self._files:
            self._files[split] = (self.directory / f"{split}.jsonl").open("a", encoding="utf-8")
        f = self._files[split]
        f.write(json.dumps({"step": int(step), **values}) + "\n")
        f.flush()
        self._writer.scalars(int(step), {f"{split}/{name}": value for name, value in values.items()})

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
