"""The public release's file formats (RUCBM/ExpInternalization), read and written exactly.

Contract:
  * Pools: a flat JSON object ``{"G0": "text", ...}``, two-space indented, non-ASCII kept as is,
    no trailing newline. ``dump_release_pool(parse_release_pool(text)) == text`` for every file
    the release writes (key order preserved). Duplicate keys, non-string texts and empty texts
    are errors naming the file and key.
  * Stats: ``{"step_<k>": {"epoch", "batch", "complete", "rollout": {"avg_reward", "Pass@<n>",
    "avg_tool_call"}}}``; ``StepStats`` reads and writes one step, ``rollout_stats`` computes the
    ``rollout`` block from our trajectories.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from expint_jax.records import Trajectory


class ReleaseFormatError(ValueError):
    """A release file is malformed; the message names the file, line and key."""


def parse_release_pool(text: str, where: str = "<pool>") -> dict[str, str]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ReleaseFormatError(f"{where}: key {key!r} appears twice")
            seen[key] = value
        return seen

    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ReleaseFormatError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ReleaseFormatError(f"{where}: expected a JSON object of id -> text, got {type(obj).__name__}")
    for key, value in obj.items():
        if not key.strip():
            raise ReleaseFormatError(f"{where}: empty experience id")
        if not isinstance(value, str) or not value.strip():
            raise ReleaseFormatError(f"{where}: key {key!r}: expected a non-empty string, got {value!r}")
    return obj


def dump_release_pool(mapping: Mapping[str, str]) -> str:
    return json.dumps(dict(mapping), indent=2, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class StepStats:
    """One ``step_<k>`` entry of the release's stats file. ``k`` is the rollouts per task."""

    epoch: int
    batch: int
    complete: bool
    avg_reward: float
    pass_at_k: float
    k: int
    avg_tool_call: float

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "complete": self.complete,
            "rollout": {"avg_reward": self.avg_reward, f"Pass@{self.k}": self.pass_at_k,
                        "avg_tool_call": self.avg_tool_call},
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> StepStats:
        if not isinstance(obj, Mapping):
            raise ReleaseFormatError(f"{where}: expected an object, got {type(obj).__name__}")
        rollout = obj.get("rollout")
        if not isinstance(rollout, Mapping):
            raise ReleaseFormatError(f"{where}: key 'rollout' must be an object")
        pass_keys = [key for key in rollout if re.fullmatch(r"Pass@\d+", key)]
        if len(pass_keys) != 1:
            raise ReleaseFormatError(f"{where}.rollout: expected exactly one 'Pass@<n>' key, got {pass_keys}")
        for key, value in (("epoch", obj.get("epoch")), ("batch", obj.get("batch"))):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ReleaseFormatError(f"{where}: key {key!r} must be an integer, got {value!r}")
        if not isinstance(obj.get("complete"), bool):
            raise ReleaseFormatError(f"{where}: key 'complete' must be true or false")
        for key in ("avg_reward", pass_keys[0], "avg_tool_call"):
            if not isinstance(rollout.get(key), (int, float)) or isinstance(rollout.get(key), bool):
                raise ReleaseFormatError(f"{where}.rollout: key {key!r} must be a number, got {rollout.get(key)!r}")
        return cls(obj["epoch"], obj["batch"], obj["complete"], rollout["avg_reward"], rollout[pass_keys[0]],
                   int(pass_keys[0].split("@")[1]), rollout["avg_tool_call"])


def parse_release_stats(text: str, where: str = "<stats>") -> dict[str, StepStats]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReleaseFormatError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ReleaseFormatError(f"{where}: expected an object of step_<k> entries")
    for key in obj:
        if not re.fullmatch(r"step_\d+", key):
            raise ReleaseFormatError(f"{where}: key {key!r} is not of the form step_<k>")
    return {key: StepStats.from_json(value, f"{where}: {key}") for key, value in obj.items()}


def dump_release_stats(steps: Mapping[str, StepStats]) -> str:
    return json.dumps({key: step.to_json() for key, step in steps.items()}, indent=2, ensure_ascii=False)


def rollout_stats(groups: Sequence[Sequence[Trajectory]], *, epoch: int, batch: int,
                  complete: bool = True) -> StepStats:
    """The release's per-step rollout block for groups of n rollouts (rewards 0/1, set)."""
    if not groups or any(not g for g in groups):
        raise ReleaseFormatError("rollout_stats needs at least one group and no empty group")
    rollouts = [t for g in groups for t in g]
    missing = [t.task_id for t in rollouts if t.reward is None]
    if missing:
        raise ReleaseFormatError(f"rollout_stats: rollouts of tasks {sorted(set(missing))} have no reward")
    return StepStats(
        epoch=epoch,
        batch=batch,
        complete=complete,
        avg_reward=sum(t.reward for t in rollouts) / len(rollouts),
        pass_at_k=sum(any(t.reward >= 1 for t in g) for g in groups) / len(groups),
        k=max(len(g) for g in groups),
        avg_tool_call=sum(t.num_tool_calls for t in rollouts) / len(rollouts),
    )
