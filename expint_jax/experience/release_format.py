"""The public release's file formats (RUCBM/ExpInternalization), read and written exactly.

Contract:
  * Pools: a flat JSON object ``{"G0": "text", ...}``, two-space indented, non-ASCII kept as is,
    no trailing newline. ``dump_release_pool(parse_release_pool(text)) == text`` for every file
    the release writes (key order preserved). Duplicate keys, non-string texts and empty texts
    are errors naming the file and key.
  * Rollouts: JSONL records ``{"id", "problem", "prompt", "groundtruth", "reward", "response",
    "trajectories": [{"agent", "trajectory": [OpenAI messages]}], ...}``. Each entry of
    ``trajectories`` becomes one ``Trajectory`` with ``task_id = str(id)``, converted to Qwen3's text
    protocol: an assistant message's ``tool_calls`` become ``<tool_call>`` blocks after its text,
    and ``role: tool`` messages become a user turn of ``<tool_response>`` blocks (consecutive tool
    messages share one turn, as in Qwen3's template). The release puts the experience pool into
    the first user message (``prompt``); our trajectories never store experience text, so that
    message is replaced by ``problem`` and the original kept in ``metadata["release_prompt"]``.
  * Stats: ``{"step_<k>": {"epoch", "batch", "complete", "rollout": {"avg_reward", "Pass@<n>",
    "avg_tool_call"}}}``; ``StepStats`` reads and writes one step, ``rollout_stats`` computes the
    ``rollout`` block from our trajectories.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from expint_jax.models.chat import format_tool_call, format_tool_response
from expint_jax.records import Message, RecordError, Trajectory, read_jsonl


class ReleaseFormatError(ValueError):
    """A release file is malformed; the message names the file, line and key."""


def _loads(text: str, where: str, **kwargs: Any) -> Any:
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as e:
        raise ReleaseFormatError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def parse_release_pool(text: str, where: str = "<pool>") -> dict[str, str]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ReleaseFormatError(f"{where}: key {key!r} appears twice")
            seen[key] = value
        return seen

    obj = _loads(text, where, object_pairs_hook=no_duplicates)
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


def read_release_rollouts(path: str | Path) -> list[Trajectory]:
    trajectories: list[Trajectory] = []
    try:
        for where, record in read_jsonl(path):
            trajectories.extend(trajectories_from_release(record, where))
    except RecordError as e:
        raise ReleaseFormatError(str(e)) from None
    return trajectories


def trajectories_from_release(record: Any, where: str) -> list[Trajectory]:
    if not isinstance(record, Mapping):
        raise ReleaseFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key, types in (("id", (int, str)), ("problem", str), ("trajectories", list)):
        if not isinstance(record.get(key), types) or isinstance(record.get(key), bool):
            raise ReleaseFormatError(f"{where}: key {key!r} is missing or has the wrong type")
    reward = record.get("reward")
    if reward is not None and (not isinstance(reward, (int, float)) or isinstance(reward, bool)):
        raise ReleaseFormatError(f"{where}: key 'reward' must be a number or null, got {reward!r}")
    ground_truth = record.get("groundtruth")
    metadata = {key: record[key] for key in ("runid", "source_id", "index", "rollout_time", "retry_count", "error")
                if key in record}
    out = []
    for k, entry in enumerate(record["trajectories"]):
        entry_where = f"{where}: trajectories[{k}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("trajectory"), list):
            raise ReleaseFormatError(f"{entry_where}: expected an object with a 'trajectory' list")
        messages = list(messages_from_release(entry["trajectory"], f"{entry_where}.trajectory"))
        extra: dict[str, Any] = {"agent": entry.get("agent")}
        first_user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
        if first_user is not None and messages[first_user].content != record["problem"]:
            extra["release_prompt"] = messages[first_user].content
            messages[first_user] = Message("user", record["problem"])
        out.append(Trajectory(
            task_id=str(record["id"]),
            messages=tuple(messages),
            termination="answer" if record.get("error") is None else "backend_error",
            num_tool_calls=sum(len(m.get("tool_calls") or []) for m in entry["trajectory"] if isinstance(m, Mapping)),
            prediction=record.get("response") if isinstance(record.get("response"), str) else None,
            reward=None if reward is None else float(reward),
            ground_truth=None if ground_truth is None else str(ground_truth),
            metadata={**metadata, **extra},
        ))
    return out


def messages_from_release(messages: Sequence[Any], where: str) -> tuple[Message, ...]:
    """OpenAI-style messages (with ``tool_calls`` and ``role: tool``) in Qwen3's text protocol."""
    out: list[Message] = []
    previous_role = None
    for i, message in enumerate(messages):
        here = f"{where}[{i}]"
        if not isinstance(message, Mapping):
            raise ReleaseFormatError(f"{here}: expected an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content") or ""
        if not isinstance(content, str):
            raise ReleaseFormatError(f"{here}: key 'content' must be a string or null")
        if role == "tool":
            block = format_tool_response(content)
            if previous_role == "tool":
                out[-1] = Message("user", f"{out[-1].content}\n{block}")
            else:
                out.append(Message("user", block))
        elif role == "assistant":
            calls = [_tool_call_text(call, f"{here}.tool_calls[{j}]")
                     for j, call in enumerate(message.get("tool_calls") or [])]
            parts = [content, *calls] if content.strip() else calls
            out.append(Message("assistant", "\n".join(parts)))
        elif role in ("system", "user"):
            out.append(Message(role, content))
        else:
            raise ReleaseFormatError(f"{here}: key 'role' is {role!r}, expected system, user, assistant or tool")
        previous_role = role
    return tuple(out)


def _tool_call_text(call: Any, where: str) -> str:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ReleaseFormatError(f"{where}: expected {{'function': {{'name': ..., 'arguments': ...}}}}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ReleaseFormatError(f"{where}: function.arguments is not valid JSON ({e.msg})") from None
    if not isinstance(arguments, Mapping):
        raise ReleaseFormatError(f"{where}: function.arguments must be a JSON object")
    return format_tool_call(function["name"], arguments)


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
    obj = _loads(text, where)
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
