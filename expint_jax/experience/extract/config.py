"""Settings of one experience-extraction run, validated on construction.

Defaults are the public release's behaviour (experience_extraction/training_free_grpo/); each
switch below names the release's choice and ours where they differ:

  * ``sampling``: the release's experience LLM runs at temperature 0 with up to 8,192 new tokens
    (``training_free_grpo/llm.py``); our earlier default was 0.7 / 2,048.
  * ``summary``: ``release`` (step by step, every task-relevant tool result, not shown whether the
    rollout was judged right, no length cap) or ``compact`` (ours: at most 200 words, shown the
    verdict; a shorter summary for a small experience model's context).
  * ``critique_sees_pool``: the release's critique sees the question, reference answer and
    labelled attempts only (False); True also shows the current pool so that the critique can
    avoid proposing lessons the pool has (ours).
  * ``group_update``: ``per_query`` (the release: one call per question deciding on all of that
    question's new lessons at once) or ``per_lesson`` (ours: one call per proposed lesson).
  * ``truncation``: when consolidation fails, ``first`` keeps the first ``max_pool_size`` items in
    pool order (the release: the previous pool's surviving items, then this run's additions), and
    ``new_first`` keeps this run's additions and rewrites first (ours: the previous pool is
    already internalized into the weights, so a full pool would otherwise never change).
  * ``max_message_chars``: each rollout message shown to the summary is kept whole (None, the
    release) or clipped to this many characters (for a small experience model's context).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from expint_jax.experience.bank import DEFAULT_MAX_POOL_SIZE, check_granularity
from expint_jax.experience.extract.prompts import SUMMARY_STYLES
from expint_jax.records import SamplingParams

GROUP_UPDATE_MODES = ("per_query", "per_lesson")
TRUNCATION_MODES = ("first", "new_first")
RELEASE_SAMPLING = SamplingParams(temperature=0.0, max_tokens=8192)


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
    granularity: str = "principle"  # which prompt family writes the lessons
    max_pool_size: int = DEFAULT_MAX_POOL_SIZE  # hard cap on the pool after every run
    max_retries: int = 2  # extra attempts per LLM request after a failed or unusable answer
    concurrency: int = 8  # conversations per backend.chat call
    sampling: SamplingParams = RELEASE_SAMPLING
    max_lessons_per_group: int = 3  # lessons kept from one critique
    max_message_chars: int | None = None  # clip each rollout message in the summary prompt (None: whole)
    informative_groups_only: bool = True  # drop judged groups that are all right or all wrong
    summary: str = "release"
    critique_sees_pool: bool = False
    group_update: str = "per_query"
    truncation: str = "first"

    def __post_init__(self) -> None:
        check_granularity(self.granularity, "ExtractionConfig.granularity")
        for name, minimum in (("max_pool_size", 1), ("max_retries", 0), ("concurrency", 1),
                              ("max_lessons_per_group", 1), ("max_message_chars", 100)):
            value = getattr(self, name)
            if name == "max_message_chars" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"ExtractionConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"ExtractionConfig.sampling must be SamplingParams, got {type(self.sampling).__name__}")
        for name, allowed in (("summary", SUMMARY_STYLES), ("group_update", GROUP_UPDATE_MODES),
                              ("truncation", TRUNCATION_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ExtractionConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.critique_sees_pool, bool):
            raise ValueError(f"ExtractionConfig.critique_sees_pool must be a bool, got {self.critique_sees_pool!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
