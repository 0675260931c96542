"""The run directory of ``expint run``: one folder per iteration and stage, each published whole.

    runs/<name>/config.json                 the run's validated configuration (latest invocation)
    runs/<name>/iter_<k>/<stage>/           a finished stage: its outputs and ``done.json``
    runs/<name>/iter_<k>/<stage>.partial/   a stage at work (or killed): what it has finished so far
    runs/<name>/report.md, plots/, tensorboard/

Contract:
  * A stage works in ``<stage>.partial/`` and is published by renaming that folder to ``<stage>/``
    after writing ``done.json`` into it; a rename is atomic, so a stage is either absent, partial
    or complete, never half published. A killed stage resumes from its partial folder (its own
    rules say what it can reuse: finished rollout batches, the trainer's checkpoints).
  * ``done.json`` holds the stage's *key*: the configuration values the stage depends on (plus the
    keys of the stages it reads), and its hash. A partial folder holds the same key in
    ``claim.json``. Running a stage whose folder holds another key is an error naming the stage
    and the differing keys (``StaleStageError``), unless the caller restarts from that stage.
  * ``restart(stages)`` moves the named stages' folders (finished or partial) out of the way
    first (``<run>/.trash/``) and deletes them once moved, so a crash mid-restart never leaves a
    stage folder that looks finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from expint_jax import storage

DONE = "done.json"
CLAIM = "claim.json"


class StaleStageError(RuntimeError):
    """A stage on disk was made with another configuration than the current one."""


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested key mappings differ (sorted)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found = []
        for name in sorted(set(old) | set(new)):
            path = f"{prefix}.{name}" if prefix else str(name)
            if name not in old or name not in new:
                found.append(path)
            else:
                found.extend(differing_keys(old[name], new[name], path))
        return found
    return [] if old == new else [prefix or "(value)"]


@dataclasses.dataclass(frozen=True)
class StageId:
    iteration: int
    name: str

    def __str__(self) -> str:
        return f"iter_{self.iteration:03d}/{self.name}"


@dataclasses.dataclass(frozen=True)
class StageDir:
    """One stage's folders and marker."""

    run_dir: Path
    stage: StageId

    @property
    def final(self) -> Path:
        return self.run_dir / f"iter_{self.stage.iteration:03d}" / self.stage.name

    @property
    def partial(self) -> Path:
        return self.final.with_name(self.stage.name + ".partial")

    def marker(self) -> dict[str, Any] | None:
        path = self.final / DONE
        return storage.read_json(path) if path.exists() else None

    def is_done(self) -> bool:
        return (self.final / DONE).exists()

    def check(self, key: Mapping[str, Any]) -> None:
        """Raises ``StaleStageError`` when the finished or partial stage on disk has another key."""
        for folder, name in ((self.final, DONE), (self.partial, CLAIM)):
            path = folder / name
            if path.exists():
                stored = storage.read_json(path)
                if stored.get("hash") != key_hash(key):
                    keys = differing_keys(stored.get("key", {}), dict(key)) or ["(inputs)"]
                    state = "finished" if name == DONE else "partial"
                    raise StaleStageError(
                        f"stage {self.stage} ({state}, {folder}) was made with another configuration: differing "
                        f"keys {', '.join(keys)}; rerun with --restart-from {self.stage.name} (or "
                        f"{self.stage}) to redo it and everything after it, or restore the old configuration")

    def begin(self, key: Mapping[str, Any]) -> Path:
        """The partial folder, claimed for ``key`` (created when missing)."""
        self.check(key)
        self.partial.mkdir(parents=True, exist_ok=True)
        if not (self.partial / CLAIM).exists():
            storage.write_json(self.partial / CLAIM, {"key": dict(key), "hash": key_hash(key)})
        return self.partial

    def publish(self, key: Mapping[str, Any], summary: Mapping[str, Any]) -> Path:
        """Writes ``done.json`` into the partial folder and renames it into place."""
        storage.write_json(self.partial / DONE, {"stage": str(self.stage), "key": dict(key), "hash": key_hash(key),
                                                 "finished_at": time.time(), "summary": dict(summary)})
        self.partial.rename(self.final)
        storage.fsync_directory(self.final.parent)
        return self.final


def restart(run_dir: Path, stages: Sequence[StageId]) -> list[StageId]:
    """Removes the folders of ``stages`` (finished or partial); returns those that existed."""
    trash = run_dir / ".trash"
    removed = []
    for stage in stages:
        folders = [p for p in (StageDir(run_dir, stage).final, StageDir(run_dir, stage).partial) if p.exists()]
        for folder in folders:
            trash.mkdir(exist_ok=True)
            target = trash / f"{stage.iteration:03d}_{folder.name}_{time.time_ns()}"
            folder.rename(target)
        if folders:
            removed.append(stage)
    if trash.exists():
        shutil.rmtree(trash)
    return removed
