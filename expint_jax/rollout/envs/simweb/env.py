"""``SimWebEnv``: the offline web-QA environment (seeded sites, search/visit tools, exact-match scoring).

Contract: the same ``SimWebConfig`` gives byte-identical sites and tasks in every process
(``to_json``). Tasks carry the question (with the site's name and root URL), the short gold answer
and metadata (level, single/multi source, style, form, answer URLs, golden paths). Scoring is
``ExactMatchJudge(containment=True, max_extra_tokens=SimWebConfig.max_extra_tokens)`` (see
``expint_jax.rollout.judge``), plus one guard for "which of A or B" questions: a prediction that
names both options scores 0, so hedging is never rewarded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from expint_jax.rollout.envs.base import Task
from expint_jax.rollout.envs.simweb.site import LEVELS
from expint_jax.rollout.envs.simweb.tasks import URL_STYLES, UrlStyle, generate
from expint_jax.rollout.envs.simweb.tools import SimSearch, SimVisit
from expint_jax.rollout.envs.simweb.world import World
from expint_jax.rollout.judge import ExactMatchJudge, answers_match
from expint_jax.rollout.tools import Tool


@dataclasses.dataclass(frozen=True)
class SimWebConfig:
    seed: int = 0
    split: str = "train"  # part of every site's seed, so train and test worlds differ
    tasks_per_level: int = 100
    levels: tuple[str, ...] = LEVELS
    tasks_per_site: int = 8
    search_top_k: int = 5
    max_extra_tokens: int = 8  # containment slack of the exact-match judge
    # "short": every URL is https://s<site>.example.org/<page> (tasks.generate); what the model
    # organism acts on: a 1M-parameter network copies 20-token URLs of names poorly (docs/organism.md).
    url_style: UrlStyle = "path"

    def __post_init__(self) -> None:
        if not self.levels or any(level not in LEVELS for level in self.levels):
            raise ValueError(f"SimWebConfig.levels must be a non-empty subset of {LEVELS}, got {self.levels!r}")
        if self.tasks_per_level < 1 or self.tasks_per_site < 1 or self.search_top_k < 1:
            raise ValueError("SimWebConfig.tasks_per_level, tasks_per_site and search_top_k must be >= 1")
        if self.url_style not in URL_STYLES:
            raise ValueError(f"SimWebConfig.url_style must be one of {URL_STYLES}, got {self.url_style!r}")


class SimWebEnv:
    name = "simweb"

    def __init__(self, config: SimWebConfig = SimWebConfig()):
        self.config = config
        sites, tasks = generate(config.seed, config.split, config.tasks_per_level, config.levels,
                                config.tasks_per_site, config.url_style)
        self.world = World(sites)
        self._tasks = tuple(tasks)
        self.judge = ExactMatchJudge(containment=True, max_extra_tokens=config.max_extra_tokens)

    def tasks(self) -> Sequence[Task]:
        return self._tasks

    def tools(self, task: Task) -> Sequence[Tool]:
        return self._tools

    @functools.cached_property
    def _tools(self) -> tuple[Tool, ...]:
        return SimSearch(self.world, top_k=self.config.search_top_k), SimVisit(self.world)

    def score(self, task: Task, prediction: str | None) -> float:
        if task.answer is None:
            raise ValueError(f"SimWeb task {task.task_id!r} has no gold answer")
        verdict = self.judge.judge(task.question, task.answer, prediction)
        if verdict.correct and prediction is not None:
            options = task.metadata.get("options", ())
            if sum(answers_match(prediction, o, containment=True, max_extra_tokens=self.config.max_extra_tokens)
                   for o in options) > 1:
                return 0.0
        return verdict.reward

    def to_json(self) -> dict[str, Any]:
        """The whole world and task list, for byte-equality checks and inspection."""
        return {
            "config": dataclasses.asdict(self.config),
            "world": self.world.to_json(),
            "tasks": [{"task_id": t.task_id, "question": t.question, "answer": t.answer,
                       "metadata": dict(t.metadata)} for t in self._tasks],
        }
