"""Rollout diagnostics the paper reports, as a pure function of a list of trajectories.

Contract: ``diagnose(trajectories)`` returns ``RolloutDiagnostics``:
  * ``accuracy``: mean reward over the trajectories that were scored (``reward is not None``);
    ``None`` when none was.
  * ``zero_tool_answer_rate``: share of all trajectories that ended with an answer
    (termination ``"answer"``) without a single tool call — the collapse symptom of global injection.
  * ``mean_assistant_turns`` / ``mean_tool_calls``: per trajectory (on-policy collapse inflates them).
  * ``terminations``: how many trajectories ended for each reason, every known reason listed.
An empty list is an error: a diagnostic over nothing would read as a result.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from expint_jax.records import TERMINATIONS, Trajectory


@dataclasses.dataclass(frozen=True)
class RolloutDiagnostics:
    num_trajectories: int
    num_scored: int
    accuracy: float | None
    zero_tool_answer_rate: float
    mean_assistant_turns: float
    mean_tool_calls: float
    terminations: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "terminations": dict(self.terminations)}


def diagnose(trajectories: Sequence[Trajectory]) -> RolloutDiagnostics:
    n = len(trajectories)
    if n == 0:
        raise ValueError("diagnose() needs at least one trajectory")
    rewards = [t.reward for t in trajectories if t.reward is not None]
    counts = Counter(t.termination for t in trajectories)
    return RolloutDiagnostics(
        num_trajectories=n,
        num_scored=len(rewards),
        accuracy=sum(rewards) / len(rewards) if rewards else None,
        zero_tool_answer_rate=sum(t.termination == "answer" and t.num_tool_calls == 0 for t in trajectories) / n,
        mean_assistant_turns=sum(t.num_assistant_turns for t in trajectories) / n,
        mean_tool_calls=sum(t.num_tool_calls for t in trajectories) / n,
        terminations={reason: counts.get(reason, 0) for reason in TERMINATIONS},
    )
