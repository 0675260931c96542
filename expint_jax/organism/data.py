"""Bootstrap trajectories: the experience-sensitive scripted agent under a mix of contexts.

Contract of ``bootstrap_trajectories(config)``:
  * Worlds: SimWeb ``split="train"`` worlds of ``config.seeds`` (the loop's worlds use seed 0 by
    default; ``organism.check_unseen_world`` refuses a loop on one of these).
  * Per world: the plain scripted agent (``Mistakes`` at ``mistake_rate``) rolls out
    ``pool_samples`` times per task; SimWeb's offline writer turns the groups into a principle
    pool and an instance pool, as the loop's extraction would.
  * Each of ``samples`` rollouts per task draws its context from ``config.mix`` (seeded by world,
    task and sample): ``none``; ``global`` (the whole principle pool in the system prompt);
    ``stepwise`` (BM25, ``k`` items per turn from the principle pool); ``stepwise_random`` (``k``
    random principle items per turn: lessons out of their situation, so the network learns what
    each lesson does rather than that any block helps); ``stepwise_instance`` (BM25
    over the instance pool). The experience-sensitive agent (``Sensitivity()``) acts inside the
    real ``ReActAgent``, so the trajectories record exactly the experience each turn saw.
  * Deterministic: the same config gives the same trajectories, in world, context, task order.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from expint_jax.experience.bank import ExperiencePool
from expint_jax.experience.extract import group_rollouts
from expint_jax.experience.inject import GlobalInjection, InjectionSpec, NoInjection, StepwiseInjection
from expint_jax.experience.select import BM25Selector, RandomSelector
from expint_jax.records import SamplingParams, Trajectory
from expint_jax.rollout.agent import AgentConfig, ReActAgent
from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
from expint_jax.rollout.envs.simweb.reference_agent import (
    Mistakes,
    ReferenceAgentConfig,
    ReferencePolicy,
    run_reference_agent,
)
from expint_jax.rollout.envs.simweb.sensitivity import Sensitivity
from expint_jax.rollout.envs.simweb.tasks import URL_STYLES, UrlStyle
from expint_jax.rollout.envs.simweb.writer import OfflineWriterConfig, write_offline

CONTEXTS = ("none", "global", "stepwise", "stepwise_random", "stepwise_instance")


@dataclasses.dataclass(frozen=True)
class ContextMix:
    """Relative weights of the contexts a bootstrap rollout is drawn under."""

    none: float = 0.3
    global_: float = 0.15
    stepwise: float = 0.25
    stepwise_random: float = 0.2
    stepwise_instance: float = 0.1

    def __post_init__(self) -> None:
        weights = self.weights()
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"ContextMix weights must be >= 0 with a positive sum, got {weights}")

    def weights(self) -> dict[str, float]:
        return {"none": self.none, "global": self.global_, "stepwise": self.stepwise,
                "stepwise_random": self.stepwise_random, "stepwise_instance": self.stepwise_instance}


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    seeds: tuple[int, ...] = (101, 102, 103, 104, 105, 106, 107, 108)
    levels: tuple[str, ...] = ("easy", "medium")
    tasks_per_level: int = 60
    # Few tasks per site: many distinct sites, so that a network learns to copy a site's name from
    # the question rather than to recall the names of the sites it trained on.
    tasks_per_site: int = 2
    samples: int = 2  # bootstrap rollouts per task, each under its own drawn context
    pool_samples: int = 4  # plain rollouts per task that the pools are written from
    mistake_rate: float = 0.35
    k: int = 4  # items per step-wise turn
    mix: ContextMix = ContextMix()
    max_llm_calls: int = 10
    max_context_tokens: int = 4096
    # The scripted agent's <think> lines before each action. Off: the organism acts in tool calls
    # and answers only (its mistakes and their response to lessons are in the actions), which
    # halves what it writes per turn and what a rollout decodes.
    think: bool = False
    # SimWebConfig.url_style of the worlds. "short" (https://s<site>.example.org/<page>) leaves the
    # network ~9 tokens to copy per visit instead of ~21 tokens of names (docs/organism.md, org12s).
    url_style: UrlStyle = "path"

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"CorpusConfig.seeds must be distinct and non-empty, got {self.seeds}")
        for name in ("tasks_per_level", "samples", "pool_samples", "k", "max_llm_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"CorpusConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.mistake_rate <= 1.0:
            raise ValueError(f"CorpusConfig.mistake_rate must be in [0, 1], got {self.mistake_rate}")
        if self.url_style not in URL_STYLES:
            raise ValueError(f"CorpusConfig.url_style must be one of {URL_STYLES}, got {self.url_style!r}")

    @property
    def mistakes(self) -> Mistakes:
        rate = self.mistake_rate
        return Mistakes(answer_early=rate, wrong_link=rate, skip_hop=rate)

    def agent(self) -> AgentConfig:
        # The scripted policy ignores sampling; the limits are the loop's organism settings.
        return AgentConfig(max_llm_calls=self.max_llm_calls, max_context_tokens=self.max_context_tokens,
                           sampling=SamplingParams(temperature=0.7, max_tokens=512))


@dataclasses.dataclass(frozen=True)
class WorldPools:
    principle: ExperiencePool
    instance: ExperiencePool


def world_pools(env: SimWebEnv, config: CorpusConfig, seed: int) -> WorldPools:
    """The pools the offline writer makes from the plain scripted agent's rollouts on ``env``."""
    groups = group_rollouts(run_reference_agent(env, n=config.pool_samples, seed=seed, mistakes=config.mistakes,
                                                think=config.think))
    return WorldPools(*(write_offline(groups, ExperiencePool(), OfflineWriterConfig(granularity=g), iteration=0)
                        for g in ("principle", "instance")))


def context_injection(context: str, pools: WorldPools, k: int, seed: int) -> InjectionSpec:
    principle, instance = pools.principle.as_mapping(), pools.instance.as_mapping()
    if context == "none" or (context == "stepwise_instance" and not instance):
        return NoInjection()
    if context == "global":
        return GlobalInjection(principle)
    if context == "stepwise":
        return StepwiseInjection(principle, BM25Selector(k=k, k_min=min(k, 3)))
    if context == "stepwise_instance":
        return StepwiseInjection(instance, BM25Selector(k=k, k_min=min(k, 3)))
    if context == "stepwise_random":
        return StepwiseInjection(principle, RandomSelector(k=k, seed=seed))
    raise ValueError(f"unknown bootstrap context {context!r}; expected one of {CONTEXTS}")


def draw_contexts(task_ids: Sequence[str], config: CorpusConfig, seed: int) -> list[list[str]]:
    """The context of each sample of each task (seeded by world, task and sample)."""
    names, weights = zip(*config.mix.weights().items())
    return [[random.Random(f"{seed}:{task_id}:{s}").choices(names, weights)[0] for s in range(config.samples)]
            for task_id in task_ids]


def bootstrap_trajectories(config: CorpusConfig) -> list[Trajectory]:
    """See the module docstring."""
    policy = ReferencePolicy(ReferenceAgentConfig(mistakes=config.mistakes, sensitivity=Sensitivity(),
                                                  think=config.think))
    out: list[Trajectory] = []
    for seed in config.seeds:
        env = SimWebEnv(SimWebConfig(seed=seed, split="train", tasks_per_level=config.tasks_per_level,
                                     levels=config.levels, tasks_per_site=config.tasks_per_site,
                                     url_style=config.url_style))
        pools = world_pools(env, config, seed)
        tasks = list(env.tasks())
        drawn = draw_contexts([t.task_id for t in tasks], config, seed)
        for context in CONTEXTS:
            for sample in range(config.samples):
                chosen = [t for t, contexts in zip(tasks, drawn) if contexts[sample] == context]
                if not chosen:
                    continue
                agent = ReActAgent(policy, config.agent(), context_injection(context, pools, config.k, seed))
                for t in agent.run_batch(chosen, env, n=1, seed=seed * 1000 + sample):
                    out.append(dataclasses.replace(t, metadata={**t.metadata, "bootstrap_context": context}))
    return out
