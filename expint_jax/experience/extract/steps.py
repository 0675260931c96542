"""The release's extraction outer loop: a pool built over many small steps, resumable per step.

``extract_experience`` is one step (one batch of rollout groups in, the updated pool out). The
release (experience_extraction/training_free_grpo/train_experience.py) runs many:

    for epoch in range(epochs):                       a fresh sample of queries per epoch
        for batch in range(queries_per_epoch // batch_size):   step k = epoch * batches + batch
            rollouts of batch_size queries x rollouts_per_query, with the current pool injected
            the pool updated from those rollouts (one extract_experience call)

3 epochs x 25 batches of 4 queries x 5 rollouts give ``step_75/experiences.json``.

Contract of ``run_extraction_steps``:
  * ``rollout(tasks, pool, step)`` produces ``rollouts_per_query`` judged trajectories per task
    (rewards set), with ``pool`` (the pool entering the step) injected as the caller chooses;
    the release's choice is the task's user message written with ``problem_with_experience``
    (no experience at all while the pool is empty). Trajectories store no experience text.
  * ``write(trajectories, pool, workdir)`` is the pool update of one step (the release's
    ``ExperienceUpdater``): ``pipeline_writer`` runs ``extract_experience`` with an LLM; any other
    writer (the loop's offline writer) fits. It may keep files in ``workdir`` to resume.
  * Layout under ``root`` (every file written atomically), the release's plus ours:

        epoch_<e>/shuffled_data.jsonl    the epoch's sampled queries {"id", "problem", "groundtruth"}
        step_<k>/rollouts.jsonl          the step's trajectories (our ``Trajectory`` records; the
                                         release writes its own records to ``rollout.jsonl``)
        step_<k>/extraction/             the writer's work directory
        step_<k+1>/experiences.json      the pool after step k, the release's flat {"G0": text} file
        step_<k+1>/pool.jsonl            the same pool with provenance (ours)
        stats.json                       the release's per-step stats: {"step_<k>": {"epoch", "batch",
                                         "complete", "rollout": {"avg_reward", "Pass@<n>", "avg_tool_call"}}}

  * Resumable: a step listed complete in ``stats.json`` (written last, after both pool files) is
    skipped; a step's rollouts are reused when its ``rollouts.jsonl`` exists, and the writer
    resumes inside ``extraction/``. The epoch samples are drawn from ``seed`` and the epoch alone,
    so a rerun draws the same queries.
  * Returns the final pool (also in ``step_<last+1>/experiences.json``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from expint_jax import storage
from expint_jax.experience.bank import ExperiencePool, read_pool, write_pool
from expint_jax.experience.extract.config import ExtractionConfig
from expint_jax.experience.extract.groups import group_rollouts
from expint_jax.experience.extract.pipeline import extract_experience
from expint_jax.experience.release_format import StepStats, dump_release_stats, parse_release_stats, rollout_stats
from expint_jax.llm.base import ChatBackend
from expint_jax.records import Trajectory, read_jsonl, read_trajectories


class ExtractionTask(Protocol):
    """What the driver needs of a training query (``rollout.envs.base.Task`` has it)."""

    task_id: str
    question: str
    answer: str | None


RolloutFn = Callable[[Sequence[ExtractionTask], ExperiencePool, int], Sequence[Trajectory]]
PoolWriter = Callable[[Sequence[Trajectory], ExperiencePool, Path], ExperiencePool]


def pipeline_writer(backend: ChatBackend, config: ExtractionConfig, *, iteration: int | None = None) -> PoolWriter:
    """The release's pool update: ``extract_experience`` on the step's rollout groups, resumable in
    its work directory (``iteration`` is recorded in each step's claim)."""

    def write(trajectories: Sequence[Trajectory], pool: ExperiencePool, workdir: Path) -> ExperiencePool:
        return extract_experience(group_rollouts(trajectories), pool, backend, config, workdir, iteration=iteration)

    return write


def problem_with_experience(problem: str, pool: Mapping[str, str]) -> str:
    """The release's extraction-rollout prompt in our words: the task is to solve the problem with the
    help of the accumulated experiences; then how (understand it, review the experiences, apply the
    ones that fit, else their general principles); then the pool (``[G0]. text`` lines) and the
    problem. An empty pool gives the problem alone, as the release does."""
    if not pool:
        return problem
    items = "\n".join(f"[{item_id}]. {text}" for item_id, text in pool.items())
    return (
        "**Task:** Solve the problem below, drawing on the relevant insights in your accumulated experiences.\n\n"
        "**How:**\n"
        "1. **Understand the problem:** work out what the **current problem** asks and what must be resolved.\n"
        "2. **Review the experiences:** decide which of the **accumulated experiences** (insights, strategies, "
        "patterns) apply to it.\n"
        "3. **Apply them with care:** when an experience fits the problem, use it explicitly in your reasoning; "
        "when none fits directly, consider whether a general principle among them still helps.\n\n"
        f"**ACCUMULATED EXPERIENCES:**\n{items}\n\n"
        f"**CURRENT PROBLEM:**\n{problem}"
    )


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How many steps, and which queries each one uses. Defaults: the paper's 3 epochs x 25 batches of
    4 queries x 5 rollouts (``queries_per_epoch=100``); None samples every query each epoch."""

    epochs: int = 3
    batch_size: int = 4
    rollouts_per_query: int = 5
    queries_per_epoch: int | None = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "rollouts_per_query"):
            if getattr(self, name) < 1:
                raise ValueError(f"StepPlan.{name} must be >= 1, got {getattr(self, name)}")
        if self.queries_per_epoch is not None and (self.queries_per_epoch < 1
                                                   or self.queries_per_epoch % self.batch_size):
            raise ValueError(f"StepPlan.queries_per_epoch ({self.queries_per_epoch}) must be a positive multiple "
                             f"of batch_size ({self.batch_size})")

    def batches_per_epoch(self, num_tasks: int) -> int:
        return self.sample_size(num_tasks) // self.batch_size

    def steps(self, num_tasks: int) -> int:
        return self.epochs * self.batches_per_epoch(num_tasks)

    def sample_size(self, num_tasks: int) -> int:
        size = num_tasks if self.queries_per_epoch is None else self.queries_per_epoch
        if size > num_tasks:
            raise ValueError(f"StepPlan: {size} queries per epoch, but only {num_tasks} tasks")
        return size - size % self.batch_size


def _epoch_sample(tasks: Sequence[ExtractionTask], plan: StepPlan, epoch: int, root: Path) -> list[ExtractionTask]:
    """The epoch's queries: read back from ``epoch_<e>/shuffled_data.jsonl``, else drawn and written."""
    path = root / f"epoch_{epoch}" / "shuffled_data.jsonl"
    by_id = {t.task_id: t for t in tasks}
    if path.exists():
        ids = [str(row["id"]) for _, row in read_jsonl(path)]
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ValueError(f"{path}: sampled queries {unknown[:5]} are not among the given tasks")
        return [by_id[i] for i in ids]
    rng = np.random.default_rng([plan.seed, epoch])
    order = rng.permutation(len(tasks))[: plan.sample_size(len(tasks))]
    sample = [tasks[i] for i in order]
    storage.write_jsonl(path, ({"id": t.task_id, "problem": t.question, "groundtruth": t.answer} for t in sample))
    return sample


def _read_stats(path: Path) -> dict[str, StepStats]:
    return parse_release_stats(path.read_text(encoding="utf-8"), where=str(path)) if path.exists() else {}


def _step_rollouts(rollout: RolloutFn, batch: Sequence[ExtractionTask], pool: ExperiencePool, step: int,
                   plan: StepPlan, path: Path) -> list[Trajectory]:
    if path.exists():
        return read_trajectories(path)
    trajectories = list(rollout(batch, pool, step))
    counts = {t.task_id: 0 for t in batch}
    for trajectory in trajectories:
        if trajectory.task_id not in counts:
            raise ValueError(f"step {step}: the rollout returned task {trajectory.task_id!r}, not in its batch")
        if trajectory.reward is None:
            raise ValueError(f"step {step}: a rollout of task {trajectory.task_id!r} has no reward (judge it first)")
        counts[trajectory.task_id] += 1
    wrong = {task: n for task, n in counts.items() if n != plan.rollouts_per_query}
    if wrong:
        raise ValueError(f"step {step}: expected {plan.rollouts_per_query} rollouts per task, got {wrong}")
    storage.write_jsonl(path, (t.to_json() for t in trajectories))
    return trajectories


def read_step_rollouts(root: str | Path, steps: int) -> list[list[Trajectory]]:
    """The trajectories of steps ``0 .. steps-1`` under ``root``, one list per step."""
    return [read_trajectories(Path(root) / f"step_{step}" / "rollouts.jsonl") for step in range(steps)]


def run_extraction_steps(
    tasks: Sequence[ExtractionTask],
    rollout: RolloutFn,
    write: PoolWriter,
    plan: StepPlan,
    root: str | Path,
    *,
    start_pool: ExperiencePool = ExperiencePool(),
    on_step_done: Callable[[int, StepStats], None] | None = None,
) -> ExperiencePool:
    """Runs every step of ``plan`` under ``root``; see the module docstring.

    Args:
      tasks: the training queries (ids unique) to sample each epoch from.
      rollout: produces the judged rollouts of a batch with a pool injected.
      write: the pool update of one step (``pipeline_writer(backend, config)`` for the LLM pipeline).
      plan: epochs, batch size, rollouts per query, queries per epoch, sampling seed.
      root: the run's directory (the release's experiment directory).
      start_pool: the pool entering step 0.
      on_step_done: called with each step that ran (not with those found complete) and its stats.

    Returns:
      The pool after the last step.
    """
    root = Path(root)
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError("run_extraction_steps: task ids must be unique")
    stats_path = root / "stats.json"
    stats = _read_stats(stats_path)
    batches = plan.batches_per_epoch(len(tasks))
    pool = start_pool
    for epoch in range(plan.epochs):
        sample = _epoch_sample(tasks, plan, epoch, root)
        for batch_index in range(batches):
            step = epoch * batches + batch_index
            step_dir = root / f"step_{step}"
            after_path = root / f"step_{step + 1}" / "pool.jsonl"
            done = stats.get(f"step_{step}")
            if done is not None and done.complete and after_path.exists():
                pool = read_pool(after_path)
                continue
            batch = sample[batch_index * plan.batch_size : (batch_index + 1) * plan.batch_size]
            trajectories = _step_rollouts(rollout, batch, pool, step, plan, step_dir / "rollouts.jsonl")
            pool = write(trajectories, pool, step_dir / "extraction")
            write_pool(after_path, pool)
            write_pool(after_path.with_name("experiences.json"), pool)
            groups = group_rollouts(trajectories)
            stats[f"step_{step}"] = rollout_stats([g.trajectories for g in groups], epoch=epoch, batch=batch_index)
            storage.write_text(stats_path, dump_release_stats(stats))
            if on_step_done is not None:
                on_step_done(step, stats[f"step_{step}"])
    return pool
