"""Experience injection: the one definition of how experience text enters a model's context.

Contract:
  * ``format_experience_block(items)`` renders ``{id: text}`` as a block that starts with its own
    separator, so injecting is plain concatenation ``content + block``; no items give ``""``.
  * ``apply_global`` appends a block to the system message, ``apply_stepwise`` to the last user
    message. Both are pure: they return a new tuple and never touch their input.
  * The injection patterns of the paper are frozen specs with a ``kind``: ``NoInjection``,
    ``GlobalInjection`` (the whole pool in the system prompt, fixed for the trajectory) and
    ``StepwiseInjection`` (a selector picks items before every assistant turn; they go into the
    last user message of that call only, never into the stored history).
  * ``inject(messages, global_block, step_block)`` is the request the agent sends;
    ``context_before_turn(trajectory, k)`` rebuilds the request behind the k-th assistant turn of a
    stored ``Trajectory`` with the same function, so both always agree (distillation relies on it).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import ClassVar

from expint_jax.experience.select import Selection, Selector
from expint_jax.records import Message, Trajectory

EXPERIENCE_HEADER = "**Relevant experiences:**"


def format_experience_block(items: Mapping[str, str]) -> str:
    """``"\\n\\n**Relevant experiences:**\\n[G3]. text\\n[G7]. text"``, or ``""`` for no items."""
    if not items:
        return ""
    lines = []
    for item_id, text in items.items():
        if not isinstance(item_id, str) or not isinstance(text, str):
            raise TypeError(f"experience {item_id!r}: ids and texts must be str, got {type(text).__name__} text")
        lines.append(f"[{item_id}]. {text}")
    return "\n\n" + EXPERIENCE_HEADER + "\n" + "\n".join(lines)


def _append_to(messages: Sequence[Message], index: int, block: str) -> tuple[Message, ...]:
    out = list(messages)
    out[index] = Message(role=out[index].role, content=out[index].content + block)
    return tuple(out)


def apply_global(messages: Sequence[Message], block: str) -> tuple[Message, ...]:
    """A copy of ``messages`` whose (first) system message ends with ``block``."""
    for i, message in enumerate(messages):
        if message.role == "system":
            return _append_to(messages, i, block)
    raise ValueError(f"global injection needs a system message; roles are {[m.role for m in messages]}")


def apply_stepwise(messages: Sequence[Message], block: str) -> tuple[Message, ...]:
    """A copy of ``messages`` whose last user message ends with ``block``."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            return _append_to(messages, i, block)
    raise ValueError(f"step-wise injection needs a user message; roles are {[m.role for m in messages]}")


def inject(messages: Sequence[Message], global_block: str = "", step_block: str = "") -> tuple[Message, ...]:
    """The request as the model sees it: stored history plus whichever blocks are non-empty."""
    out = tuple(messages)
    if global_block:
        out = apply_global(out, global_block)
    if step_block:
        out = apply_stepwise(out, step_block)
    return out


def _frozen_pool(pool: Mapping[str, str], owner: str) -> Mapping[str, str]:
    for item_id, text in pool.items():
        if not isinstance(item_id, str) or not isinstance(text, str):
            raise TypeError(f"{owner}: pool item {item_id!r} must map a str id to str text")
    return types.MappingProxyType(dict(pool))


@dataclasses.dataclass(frozen=True)
class NoInjection:
    """The agent sees no experience."""

    kind: ClassVar[str] = "none"


@dataclasses.dataclass(frozen=True)
class GlobalInjection:
    """The whole pool is appended to the system prompt, identical for every call of a trajectory."""

    pool: Mapping[str, str]
    kind: ClassVar[str] = "global"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool", _frozen_pool(self.pool, "GlobalInjection"))

    @property
    def block(self) -> str:
        return format_experience_block(self.pool)


@dataclasses.dataclass(frozen=True)
class StepwiseInjection:
    """Before each assistant turn ``selector`` picks items; they go into the last user message."""

    pool: Mapping[str, str]
    selector: Selector
    kind: ClassVar[str] = "stepwise"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool", _frozen_pool(self.pool, "StepwiseInjection"))

    def block_for(self, ids: Sequence[str]) -> str:
        unknown = [i for i in ids if i not in self.pool]
        if unknown:
            raise KeyError(f"selected experience ids {unknown} are not in the pool")
        return format_experience_block({i: self.pool[i] for i in ids})


InjectionSpec = NoInjection | GlobalInjection | StepwiseInjection


def make_injection(
    kind: str, pool: Mapping[str, str] | None = None, selector: Selector | None = None
) -> InjectionSpec:
    """Builds the spec for a configured injection ``kind`` (``none`` | ``global`` | ``stepwise``).

    Args:
      kind: the injection pattern.
      pool: the experience items by display id (``{"G0": text, ...}``); required unless ``none``.
      selector: picks each turn's items; required for ``stepwise``.
    """
    if kind == "none":
        return NoInjection()
    if pool is None:
        raise ValueError(f"injection {kind!r} needs an experience pool")
    if kind == "global":
        return GlobalInjection(pool)
    if kind == "stepwise":
        if selector is None:
            raise ValueError("injection 'stepwise' needs a selector (llm, bm25, embedding or all)")
        return StepwiseInjection(pool, selector)
    raise ValueError(f"unknown injection kind {kind!r}; expected one of none, global, stepwise")


def context_before_turn(trajectory: Trajectory, k: int) -> tuple[Message, ...]:
    """The exact messages the model received for the k-th (0-based) assistant turn of ``trajectory``."""
    positions = [i for i, m in enumerate(trajectory.messages) if m.role == "assistant"]
    if not 0 <= k < len(positions):
        raise IndexError(
            f"trajectory {trajectory.task_id!r} has {len(positions)} assistant turns; turn {k} does not exist"
        )
    step_block = trajectory.step_injections[k] if trajectory.step_injections else ""
    return inject(trajectory.messages[: positions[k]], trajectory.global_injection, step_block)


def annotate_injections(trajectories: Sequence[Trajectory], spec: InjectionSpec) -> list[Trajectory]:
    """The trajectories with the experience a teacher under ``spec`` would have seen.

    Messages are left as they are; only ``injection``, ``global_injection``, ``step_injections``
    and ``step_experience_ids`` change. This gives a teacher context to trajectories written
    without experience (the student's own rollouts in on-policy distillation, or any recorded
    rollouts). Step-wise selection sees exactly what the agent's selector would have seen (the
    stored history before each turn) and runs as one ``select_batch`` over all turns.
    """
    if isinstance(spec, NoInjection):
        return [dataclasses.replace(t, injection="none", global_injection="", step_injections=(),
                                    step_experience_ids=()) for t in trajectories]
    if isinstance(spec, GlobalInjection):
        return [dataclasses.replace(t, injection="global", global_injection=spec.block, step_injections=(),
                                    step_experience_ids=()) for t in trajectories]
    histories, owners = [], []
    for index, trajectory in enumerate(trajectories):
        for position, message in enumerate(trajectory.messages):
            if message.role == "assistant":
                histories.append(trajectory.messages[:position])
                owners.append(index)
    selections = spec.selector.select_batch(histories, spec.pool) if histories else []
    per_trajectory: list[list[Selection]] = [[] for _ in trajectories]
    for owner, selection in zip(owners, selections, strict=True):
        per_trajectory[owner].append(selection)
    return [
        dataclasses.replace(
            trajectory,
            injection="stepwise",
            global_injection="",
            step_injections=tuple(spec.block_for(s.ids) for s in chosen),
            step_experience_ids=tuple(tuple(s.ids) for s in chosen),
        )
        for trajectory, chosen in zip(trajectories, per_trajectory, strict=True)
    ]
