"""The organism's gate: does the *network* act better with the right lessons in its context?

``run_gate(backend)`` (``expint organism gate --checkpoint DIR``) rolls the network out (``LocalEngine`` inside
the real ``ReActAgent``) on held-out SimWeb tasks -- the test split of the loop's world (seed 0 by
default), never seen in the bootstrap -- ``--samples`` times per task, under each injection:
``none``, ``stepwise`` (the principle pool, BM25, ``--k`` items per turn), ``global`` (the whole
pool in the system prompt) and ``stepwise_random`` (``--k`` random items per turn: the control for
relevance). The pool is the offline writer's principle pool from the scripted agent's rollouts on
the loop's training world, so it is the same for every checkpoint.

``url_style``: the held-out worlds' URLs, as the checkpoint learned them (the CLI reads it from
``organism.json``).

``format_result`` gives one row per injection (accuracy with a 95 % interval over tasks, premature answers, tool
calls, items shown per turn) and the paired difference stepwise - none with its 95 % interval
(per-task differences: every injection sees the same tasks and seeds). The gate of issue 14: stepwise - none >= 0.15 on >= 100 tasks x 3 samples.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

from expint_jax.experience.inject import GlobalInjection, InjectionSpec, NoInjection, StepwiseInjection
from expint_jax.experience.select import BM25Selector, RandomSelector
from expint_jax.records import SamplingParams, Trajectory
from expint_jax.rollout.agent import AgentConfig, ReActAgent
from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
from expint_jax.rollout.envs.simweb.measure import Row, format_rows, interleaved_tasks, summarize
from expint_jax.organism.data import CorpusConfig, world_pools

INJECTIONS = ("none", "stepwise", "global", "stepwise_random")


@dataclasses.dataclass(frozen=True)
class GateResult:
    rows: tuple[Row, ...]
    difference: float  # mean per-task accuracy, stepwise - none
    difference_ci95: float  # half-width
    tasks: int
    samples: int

    def to_json(self) -> dict:
        return {"rows": [dataclasses.asdict(r) for r in self.rows], "stepwise_minus_none": self.difference,
                "stepwise_minus_none_ci95": self.difference_ci95, "tasks": self.tasks, "samples": self.samples}


def per_task_accuracy(runs: Sequence[Trajectory], samples: int) -> list[float]:
    return [statistics.fmean((t.reward or 0.0) for t in runs[i:i + samples]) for i in range(0, len(runs), samples)]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of a - b and its 95 % half-width (normal approximation over the pairs)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), 1.96 * spread / math.sqrt(len(diffs))


def injections(principle: dict[str, str], k: int, seed: int) -> dict[str, InjectionSpec]:
    return {"none": NoInjection(), "stepwise": StepwiseInjection(principle, BM25Selector(k=k, k_min=min(k, 3))),
            "global": GlobalInjection(principle), "stepwise_random": StepwiseInjection(principle, RandomSelector(k, seed))}


def run_gate(backend, *, world_seed: int = 0, levels: tuple[str, ...] = ("easy", "medium"), tasks: int = 100,
             samples: int = 3, k: int = 4, seed: int = 0, agent: AgentConfig | None = None,
             which: Sequence[str] = INJECTIONS, url_style: str = "path") -> GateResult:
    corpus = dataclasses.replace(CorpusConfig(), seeds=(world_seed,), levels=levels)
    train = SimWebEnv(SimWebConfig(seed=world_seed, split="train", tasks_per_level=corpus.tasks_per_level,
                                   levels=levels, url_style=url_style))
    principle = world_pools(train, corpus, world_seed).principle.as_mapping()
    test = SimWebEnv(SimWebConfig(seed=world_seed, split="test", tasks_per_level=math.ceil(tasks / len(levels)),
                                  levels=levels, url_style=url_style))
    chosen = interleaved_tasks(test, tasks)
    agent = agent or AgentConfig(max_llm_calls=10, max_context_tokens=4096,
                                 sampling=SamplingParams(temperature=0.7, top_p=0.95, max_tokens=256))
    specs = injections(principle, k, seed)
    rows, accuracy = [], {}
    for name in which:
        runs = ReActAgent(backend, agent, specs[name]).run_batch(chosen, test, n=samples, seed=seed)
        rows.append(summarize(name, runs, samples))
        accuracy[name] = per_task_accuracy(runs, samples)
    diff, ci = paired_difference(accuracy["stepwise"], accuracy["none"]) if {"stepwise", "none"} <= set(accuracy) \
        else (math.nan, math.nan)
    return GateResult(tuple(rows), diff, ci, len(chosen), samples)


def format_result(result: GateResult, where: str) -> str:
    lines = [f"{where}: {result.tasks} held-out tasks x {result.samples} samples", format_rows(result.rows)]
    if not math.isnan(result.difference):
        lines.append(f"stepwise - none: {result.difference:+.3f} ± {result.difference_ci95:.3f} "
                     "(95 % CI, paired over tasks)")
    return "\n".join(lines)
