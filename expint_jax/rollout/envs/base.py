"""The environment interface: tasks, the tools an agent may use on a task, and a verifier.

Contract: ``tasks()`` is deterministic for a given configuration (seeded generators), and
``score(task, prediction)`` returns a reward in [0, 1] (1 = correct) without network access
unless the environment was configured with an LLM judge endpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from expint_jax.rollout.tools import Tool


@dataclasses.dataclass(frozen=True)
class Task:
    task_id: str
    question: str
    answer: str | None = None  # ground truth, when known
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Environment(Protocol):
    name: str

    def tasks(self) -> Sequence[Task]: ...

    def tools(self, task: Task) -> Sequence[Tool]: ...

    def score(self, task: Task, prediction: str | None) -> float: ...
