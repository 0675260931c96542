"""Settings of one experience-extraction run, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

from expint_jax.experience.bank import DEFAULT_MAX_POOL_SIZE, check_granularity
from expint_jax.records import SamplingParams


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
    granularity: str = "principle"  # which prompt family writes the lessons
    max_pool_size: int = DEFAULT_MAX_POOL_SIZE  # hard cap on the pool after every run
    max_retries: int = 2  # extra attempts per LLM request after a failed or unusable answer
    concurrency: int = 8  # conversations per backend.chat call
    sampling: SamplingParams = SamplingParams(temperature=0.7, max_tokens=2048)
    max_lessons_per_group: int = 3  # lessons kept from one critique
    max_message_chars: int = 3000  # each rollout message is clipped to this in the summary prompt
    informative_groups_only: bool = True  # drop judged groups that are all right or all wrong

    def __post_init__(self) -> None:
        check_granularity(self.granularity, "ExtractionConfig.granularity")
        for name, minimum in (("max_pool_size", 1), ("max_retries", 0), ("concurrency", 1),
                              ("max_lessons_per_group", 1), ("max_message_chars", 100)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"ExtractionConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"ExtractionConfig.sampling must be SamplingParams, got {type(self.sampling).__name__}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
