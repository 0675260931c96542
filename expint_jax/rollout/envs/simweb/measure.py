"""Measures the experience-sensitive SimWeb organism: accuracy under none / global / step-wise injection.

``python -m expint_jax.rollout.envs.simweb.measure`` (``--help`` for the knobs) does, offline and in
seconds:
  1. the plain reference agent (``Mistakes`` at ``--mistake-rate`` each) rolls out ``--samples``
     times on the train split; the offline writer turns the groups into a pool
     (``--granularity``, principle by default);
  2. ``ReferencePolicy`` with ``Sensitivity()`` runs inside ``ReActAgent`` on ``--eval-tasks``
     held-out test-split tasks (levels interleaved) x ``--samples``, once per injection: none,
     global (the whole pool in the system prompt), step-wise (``--selector``, ``--k`` items per
     turn) and, as an ablation, global without the finishing lesson;
  3. prints the designed effects (``sensitivity.designed_effects``), the pool, and one table row
     per injection: accuracy with a 95 % interval over tasks, premature answers (no tool call),
     answers given before any page was opened, tool calls and experience items shown per turn.
With ``--iterations N`` it also runs the writer for N iterations with every mistake rate
multiplied by ``--fade`` per iteration (a stand-in for internalization, not the loop) and prints
each ``PoolStep``: the pool gains lessons for new mistakes and, with ``retire_unsupported``,
loses those of faded ones.

Everything the numbers show is designed in (``sensitivity.py``); none of it is learned.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from collections.abc import Sequence

from expint_jax.experience.bank import ExperiencePool
from expint_jax.experience.extract import group_rollouts
from expint_jax.experience.inject import GlobalInjection, InjectionSpec, NoInjection, StepwiseInjection
from expint_jax.experience.select import AllSelector, BM25Selector
from expint_jax.records import Trajectory
from expint_jax.rollout.agent import ReActAgent
from expint_jax.rollout.envs.base import Task
from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
from expint_jax.rollout.envs.simweb.lessons import FINISHING, recognise
from expint_jax.rollout.envs.simweb.reference_agent import (
    Mistakes,
    ReferenceAgentConfig,
    ReferencePolicy,
    run_reference_agent,
)
from expint_jax.rollout.envs.simweb.sensitivity import Sensitivity, designed_effects, experience_items
from expint_jax.rollout.envs.simweb.writer import OfflineWriterConfig, PoolStep, write_iteration, write_offline


@dataclasses.dataclass(frozen=True)
class Row:
    injection: str
    accuracy: float
    ci95: float  # half-width, over per-task means
    premature: float  # share of rollouts answering with no tool call
    unread: float  # share answering before any page was opened
    tool_calls: float
    items_per_turn: float


def interleaved_tasks(env: SimWebEnv, count: int) -> list[Task]:
    """``count`` tasks taking the levels in turn (the env lists them level by level)."""
    by_level: dict[str, list[Task]] = {}
    for task in env.tasks():
        by_level.setdefault(task.metadata["level"], []).append(task)
    columns = list(by_level.values())
    ordered = [column[i] for i in range(max(map(len, columns))) for column in columns if i < len(column)]
    return ordered[:count]


def _shown_per_turn(t: Trajectory) -> float:
    turns = max(1, sum(m.role == "assistant" for m in t.messages))
    global_items = len(experience_items(t.global_injection)) * turns
    step_items = sum(len(experience_items(block)) for block in t.step_injections)
    return (global_items + step_items) / turns


def summarize(name: str, runs: Sequence[Trajectory], samples: int) -> Row:
    per_task = [statistics.fmean(t.reward or 0.0 for t in runs[i:i + samples]) for i in range(0, len(runs), samples)]
    spread = statistics.stdev(per_task) if len(per_task) > 1 else 0.0
    unread = sum(not any('"visit"' in m.content for m in t.messages if m.role == "assistant") for t in runs)
    return Row(name, statistics.fmean(per_task), 1.96 * spread / math.sqrt(len(per_task)),
               sum(t.num_tool_calls == 0 for t in runs) / len(runs), unread / len(runs),
               statistics.fmean(t.num_tool_calls for t in runs), statistics.fmean(map(_shown_per_turn, runs)))


def offline_pool(mistakes: Mistakes, *, seed: int, tasks_per_level: int, samples: int,
                 granularity: str) -> ExperiencePool:
    train = SimWebEnv(SimWebConfig(seed=seed, split="train", tasks_per_level=tasks_per_level))
    groups = group_rollouts(run_reference_agent(train, n=samples, seed=seed, mistakes=mistakes))
    return write_offline(groups, ExperiencePool(), OfflineWriterConfig(granularity=granularity), iteration=0)


def injections(pool: ExperiencePool, selector: str, k: int) -> list[tuple[str, InjectionSpec]]:
    items = pool.as_mapping()
    chosen = AllSelector() if selector == "all" else BM25Selector(k=k, k_min=min(3, k))
    without_finishing = {i: text for i, text in items.items() if not _is_finishing(text)}
    return [("none", NoInjection()), ("global", GlobalInjection(items)), ("stepwise", StepwiseInjection(items, chosen)),
            ("global, no finishing lesson", GlobalInjection(without_finishing))]


def _is_finishing(text: str) -> bool:
    lesson = recognise(text)
    return lesson is not None and lesson.key == FINISHING


def evaluate(pool: ExperiencePool, mistakes: Mistakes, *, seed: int, eval_tasks: int, samples: int,
             selector: str = "bm25", k: int = 5, sensitivity: Sensitivity | None = Sensitivity()) -> list[Row]:
    test = SimWebEnv(SimWebConfig(seed=seed, split="test", tasks_per_level=math.ceil(eval_tasks / 3)))
    tasks = interleaved_tasks(test, eval_tasks)
    config = ReferenceAgentConfig(mistakes=mistakes, sensitivity=sensitivity)
    rows = []
    for name, injection in injections(pool, selector, k):
        runs = ReActAgent(ReferencePolicy(config), injection=injection).run_batch(tasks, test, n=samples, seed=seed)
        rows.append(summarize(name, runs, samples))
    return rows


def fading_pools(mistakes: Mistakes, *, iterations: int, fade: float, seed: int, tasks_per_level: int,
                 samples: int, granularity: str) -> list[PoolStep]:
    """The writer over ``iterations`` with every mistake rate multiplied by ``fade`` each iteration."""
    train = SimWebEnv(SimWebConfig(seed=seed, split="train", tasks_per_level=tasks_per_level))
    config = OfflineWriterConfig(granularity=granularity, retire_unsupported=True)
    pool, steps = ExperiencePool(), []
    for iteration in range(iterations):
        scale = fade ** iteration
        rates = Mistakes(**{f.name: getattr(mistakes, f.name) * scale for f in dataclasses.fields(Mistakes)})
        groups = group_rollouts(run_reference_agent(train, n=samples, seed=seed + iteration, mistakes=rates))
        steps.append(write_iteration(groups, pool, config, iteration=iteration))
        pool = steps[-1].pool
    return steps


def format_rows(rows: Sequence[Row]) -> str:
    header = "| injection | accuracy (95% CI) | no-tool answers | answered unread | tool calls | items/turn |"
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.injection} | {r.accuracy:.3f} ± {r.ci95:.3f} | {r.premature:.3f} | {r.unread:.3f} | "
                     f"{r.tool_calls:.2f} | {r.items_per_turn:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expint_jax.rollout.envs.simweb.measure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mistake-rate", type=float, default=0.35)
    parser.add_argument("--train-tasks-per-level", type=int, default=20)
    parser.add_argument("--eval-tasks", type=int, default=40)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--granularity", choices=("principle", "instance"), default="principle")
    parser.add_argument("--selector", choices=("bm25", "all"), default="bm25")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--insensitive", action="store_true", help="the agent ignores experience (today's default)")
    parser.add_argument("--iterations", type=int, default=0)
    parser.add_argument("--fade", type=float, default=0.5)
    args = parser.parse_args(argv)
    rate = args.mistake_rate
    mistakes = Mistakes(answer_early=rate, wrong_link=rate, skip_hop=rate)
    sensitivity = None if args.insensitive else Sensitivity()
    pool = offline_pool(mistakes, seed=args.seed, tasks_per_level=args.train_tasks_per_level, samples=args.samples,
                        granularity=args.granularity)
    print("Designed effects (sensitivity.py):\n" + designed_effects(sensitivity or Sensitivity()) + "\n")
    print(f"{args.granularity} pool from the train split ({len(pool)} items):")
    for item in pool:
        print(f"  {item.id}: {item.text}")
    rows = evaluate(pool, mistakes, seed=args.seed, eval_tasks=args.eval_tasks, samples=args.samples,
                    selector=args.selector, k=args.k, sensitivity=sensitivity)
    print(f"\nReferencePolicy{'' if sensitivity else ' (insensitive)'} in ReActAgent, {args.eval_tasks} held-out tasks "
          f"x {args.samples} samples, mistakes {rate} each, step-wise selector {args.selector} k={args.k}:")
    print(format_rows(rows))
    if args.iterations:
        print(f"\nWriter over {args.iterations} iterations, mistake rates x{args.fade} per iteration "
              "(retire_unsupported):")
        for step in fading_pools(mistakes, iterations=args.iterations, fade=args.fade, seed=args.seed,
                                 tasks_per_level=args.train_tasks_per_level, samples=args.samples,
                                 granularity=args.granularity):
            print("  " + step.summary())
            for text in step.gained:
                print(f"    + {text[:100]}")
            for text in step.lost:
                print(f"    - {text[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
