"""Rollout groups: the n scored rollouts of one training task, the unit the critique compares.

A group is informative when its rollouts disagree: with rewards known (ground truth exists), only
groups with 0 < mean reward < 1 teach anything by contrast, so only those are used; a group with
any unjudged rollout (reward None) is always kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from expint_jax.records import Trajectory


@dataclasses.dataclass(frozen=True)
class RolloutGroup:
    task_id: str
    trajectories: tuple[Trajectory, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "trajectories", tuple(self.trajectories))
        if not self.trajectories:
            raise ValueError(f"rollout group {self.task_id!r} has no trajectories")
        others = sorted({t.task_id for t in self.trajectories} - {self.task_id})
        if others:
            raise ValueError(f"rollout group {self.task_id!r} holds trajectories of other tasks: {others}")
        if not any(m.role == "user" for m in self.trajectories[0].messages):
            raise ValueError(f"rollout group {self.task_id!r}: the first trajectory has no user message (the task)")

    @property
    def question(self) -> str:
        return next(m.content for m in self.trajectories[0].messages if m.role == "user")

    @property
    def reference(self) -> str | None:
        return next((t.ground_truth for t in self.trajectories if t.ground_truth is not None), None)

    @property
    def mean_reward(self) -> float | None:
        rewards = [t.reward for t in self.trajectories]
        if any(r is None for r in rewards):
            return None
        return sum(rewards) / len(rewards)

    @property
    def is_informative(self) -> bool:
        mean = self.mean_reward
        return mean is None or 0 < mean < 1


def group_rollouts(trajectories: Iterable[Trajectory]) -> list[RolloutGroup]:
    """Groups by ``task_id``, in order of first appearance."""
    by_task: dict[str, list[Trajectory]] = {}
    for trajectory in trajectories:
        by_task.setdefault(trajectory.task_id, []).append(trajectory)
    return [RolloutGroup(task_id, tuple(group)) for task_id, group in by_task.items()]
