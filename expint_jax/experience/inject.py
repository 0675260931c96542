"""Experience injection: the one definition of how experience text enters a model's context.

Contract:
  * Blocks start with their own separator, so injecting is plain concatenation ``content + block``;
    no items give ``""``. Items are lines ``G3: text``, as the release writes them.
    ``format_experience_block(items)`` is the step-wise block (``STEP_HEADER``, then the items);
    ``format_global_block(pool)`` is the global block (``GLOBAL_INSTRUCTION`` telling the agent to
    solve the problem with the help of its accumulated experiences, ``GLOBAL_HEADER``, the items),
    the structure of the release's global agent (evaluation/run_multi_react.py).
  * ``apply_global`` appends a block to the system message, ``apply_stepwise`` to the last user
    message. Both are pure: they return a new tuple and never touch their input.
  * The injection patterns of the paper are frozen specs with a ``kind``: ``NoInjection``,
    ``GlobalInjection`` (the whole pool in the system prompt, fixed for the trajectory) and
    ``StepwiseInjection`` (a selector picks items before every assistant turn; they go into the
    last user message of that call only, never into the stored history). Every spec has a
    ``system_block``, the text appended to the system prompt of every call: the global block, or
    for step-wise ``STEPWISE_SYSTEM_NOTE``, the release's paragraph announcing that experiences
    chosen for the current step come before each reply. It is teacher-only context like the
    blocks themselves: a trajectory keeps it in ``global_injection``, never in its messages.
    ``StepwiseInjection(system_note="")`` (``make_injection(..., stepwise_system_note=False)``)
    switches it off. The release puts that paragraph between its instructions and its tool list;
    we append it after the tools, since every injection here is an append.
  * ``inject(messages, global_block, step_block)`` is the request the agent sends;
    ``context_before_turn(trajectory, k)`` rebuilds the request behind the k-th assistant turn of a
    stored ``Trajectory`` with the same function, so both always agree (distillation relies on it).
  * A forced-answer turn (``records.FORCED_ANSWER_TURN`` in the trajectory's metadata) gets no
    step-wise block and no selection, in the agent and in ``annotate_injections`` alike: the
    release's forced-answer call sends the history without a block.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from expint_jax.experience.select import Selection, Selector
from expint_jax.records import EXP_SELECTIONS, FORCED_ANSWER_TURN, Message, Trajectory

# Our wording of the release's texts (evaluation/prompt_step_wise.py, evaluation/run_multi_react.py).
STEP_HEADER = "**Experiences relevant to this step:**"
EXPERIENCE_HEADER = STEP_HEADER  # the name earlier code and tests use
GLOBAL_INSTRUCTION = "Solve the problem with the help of whichever of your accumulated experiences below apply to it."
GLOBAL_HEADER = "**Accumulated experiences:**"
STEPWISE_SYSTEM_NOTE = (
    "Before each of your replies you will be given a few **experiences relevant to this step**: insights "
    "from earlier successful research sessions, chosen for the step you are at. Make active use of them to "
    "guide your strategy, your choice and use of tools, how you verify what you find, and how you write "
    "your answer at this step."
)


def format_items(items: Mapping[str, str]) -> str:
    """One line ``id: text`` per item, in order."""
    lines = []
    for item_id, text in items.items():
        if not isinstance(item_id, str) or not isinstance(text, str):
            raise TypeError(f"experience {item_id!r}: ids and texts must be str, got {type(text).__name__} text")
        lines.append(f"{item_id}: {text}")
    return "\n".join(lines)


def format_experience_block(items: Mapping[str, str]) -> str:
    """The step-wise block ``"\\n\\n<STEP_HEADER>\\nG3: text\\nG7: text"``, or ``""`` for no items."""
    if not items:
        return ""
    return "\n\n" + STEP_HEADER + "\n" + format_items(items)


def format_global_block(pool: Mapping[str, str]) -> str:
    """``"\\n\\n<GLOBAL_INSTRUCTION>\\n\\n<GLOBAL_HEADER>\\nG0: text\\n..."``, or ``""`` for an empty pool."""
    if not pool:
        return ""
    return "\n\n" + GLOBAL_INSTRUCTION + "\n\n" + GLOBAL_HEADER + "\n" + format_items(pool)


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
    system_block: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class GlobalInjection:
    """The whole pool is appended to the system prompt, identical for every call of a trajectory."""

    pool: Mapping[str, str]
    kind: ClassVar[str] = "global"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool", _frozen_pool(self.pool, "GlobalInjection"))

    @property
    def block(self) -> str:
        return format_global_block(self.pool)

    @property
    def system_block(self) -> str:
        return self.block


@dataclasses.dataclass(frozen=True)
class StepwiseInjection:
    """Before each assistant turn ``selector`` picks items; they go into the last user message.

    ``system_note`` is appended to the system prompt of every call (``STEPWISE_SYSTEM_NOTE`` by
    default, as the release does; "" for none).
    """

    pool: Mapping[str, str]
    selector: Selector
    system_note: str = STEPWISE_SYSTEM_NOTE
    kind: ClassVar[str] = "stepwise"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool", _frozen_pool(self.pool, "StepwiseInjection"))

    @property
    def system_block(self) -> str:
        return "\n\n" + self.system_note if self.system_note else ""

    def block_for(self, ids: Sequence[str]) -> str:
        unknown = [i for i in ids if i not in self.pool]
        if unknown:
            raise KeyError(f"selected experience ids {unknown} are not in the pool")
        return format_experience_block({i: self.pool[i] for i in ids})


InjectionSpec = NoInjection | GlobalInjection | StepwiseInjection


def make_injection(
    kind: str, pool: Mapping[str, str] | None = None, selector: Selector | None = None,
    *, stepwise_system_note: bool = True,
) -> InjectionSpec:
    """Builds the spec for a configured injection ``kind`` (``none`` | ``global`` | ``stepwise``).

    Args:
      kind: the injection pattern.
      pool: the experience items by display id (``{"G0": text, ...}``); required unless ``none``.
      selector: picks each turn's items; required for ``stepwise``.
      stepwise_system_note: whether step-wise calls carry ``STEPWISE_SYSTEM_NOTE`` in the system
        prompt (the release's behaviour); False is the ablation without it.
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
        return StepwiseInjection(pool, selector, STEPWISE_SYSTEM_NOTE if stepwise_system_note else "")
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


def forced_answer_turn(trajectory: Trajectory) -> int | None:
    """The index of the assistant turn that answered a forced-answer request, if any."""
    turn = trajectory.metadata.get(FORCED_ANSWER_TURN)
    valid = isinstance(turn, int) and not isinstance(turn, bool) and 0 <= turn < trajectory.num_assistant_turns
    return turn if valid else None


def selection_log(selections: Sequence[tuple[int, Selection]]) -> list[dict[str, Any]]:
    """``[{"round", "selected_ids", "rationale"}]`` for ``(turn, selection)`` pairs, as the release logs them
    (``round`` counts from 1); a selection made by a fallback also names it under ``"fallback"``."""
    return [{"round": turn + 1, "selected_ids": list(s.ids), "rationale": s.rationale or "",
             **({"fallback": s.fallback} if s.fallback else {})} for turn, s in selections]


def annotate_injections(trajectories: Sequence[Trajectory], spec: InjectionSpec) -> list[Trajectory]:
    """The trajectories with the experience a teacher under ``spec`` would have seen.

    Messages are left as they are; only ``injection``, ``global_injection`` (``spec.system_block``),
    ``step_injections``, ``step_experience_ids`` and ``metadata[EXP_SELECTIONS]`` change. This gives
    a teacher context to trajectories written without experience (the student's own rollouts in
    on-policy distillation, or any recorded rollouts). Step-wise selection sees exactly what the
    agent's selector would have seen (the stored history before each turn) and runs as one
    ``select_batch`` over all turns but a forced-answer turn, which gets no block (as in the agent).
    """
    def without_log(t: Trajectory) -> dict[str, Any]:
        return {k: v for k, v in t.metadata.items() if k != EXP_SELECTIONS}

    if not isinstance(spec, StepwiseInjection):
        return [dataclasses.replace(t, injection=spec.kind, global_injection=spec.system_block, step_injections=(),
                                    step_experience_ids=(), metadata=without_log(t)) for t in trajectories]
    histories, owners = [], []
    for index, trajectory in enumerate(trajectories):
        forced = forced_answer_turn(trajectory)
        positions = [i for i, m in enumerate(trajectory.messages) if m.role == "assistant"]
        for turn, position in enumerate(positions):
            if turn != forced:
                histories.append(trajectory.messages[:position])
                owners.append((index, turn))
    selections = spec.selector.select_batch(histories, spec.pool) if histories else []
    chosen: list[dict[int, Selection]] = [{} for _ in trajectories]
    for (owner, turn), selection in zip(owners, selections, strict=True):
        chosen[owner][turn] = selection
    out = []
    for trajectory, picks in zip(trajectories, chosen, strict=True):
        turns = range(trajectory.num_assistant_turns)
        out.append(dataclasses.replace(
            trajectory,
            injection="stepwise",
            global_injection=spec.system_block,
            step_injections=tuple(spec.block_for(picks[k].ids) if k in picks else "" for k in turns),
            step_experience_ids=tuple(tuple(picks[k].ids) if k in picks else () for k in turns),
            metadata={**without_log(trajectory), EXP_SELECTIONS: selection_log(sorted(picks.items()))},
        ))
    return out
