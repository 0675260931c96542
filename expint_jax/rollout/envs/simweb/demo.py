"""SimWeb's offline demo data: scripted rollouts, an offline-written pool, teacher contexts attached.

``demo_trajectories(DemoData(...), directory)`` is what ``expint distill`` trains on when it is
given no trajectory files: the scripted reference agent (with seeded mistakes, so groups are
partly right) rolls out on generated train and eval tasks, the deterministic offline writer
turns the scored train groups into a principle-level pool, and each assistant turn gets the
experience a teacher would see (``annotate_injections`` with the configured injection and
selector). The three files (``train.jsonl``, ``eval.jsonl``, ``pool.jsonl``) are written under
``directory`` and reloaded, not rebuilt, when all three exist. Everything is seeded by
``DemoData.seed``: the same section gives the same files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from expint_jax import storage
from expint_jax.experience.bank import ExperiencePool, read_pool, write_pool
from expint_jax.experience.extract.groups import group_rollouts
from expint_jax.experience.inject import annotate_injections, make_injection
from expint_jax.experience.select import make_selector
from expint_jax.records import Trajectory, read_trajectories
from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
from expint_jax.rollout.envs.simweb.reference_agent import Mistakes, run_reference_agent
from expint_jax.rollout.envs.simweb.writer import OfflineWriterConfig, write_offline


@dataclasses.dataclass(frozen=True)
class DemoData:
    """Offline SimWeb data (used by ``expint distill`` when ``data.train`` is empty)."""

    seed: int = 0
    train_tasks_per_level: int = 8
    eval_tasks_per_level: int = 2
    levels: tuple[str, ...] = ("easy", "medium")
    rollouts_per_task: int = 4
    mistake_rate: float = 0.3  # chance of each scripted mistake, so groups are partly right
    max_pool_size: int = 50
    injection: Literal["global", "stepwise"] = "stepwise"
    selector: Literal["bm25", "all"] = "bm25"
    selector_k: int = 4


def demo_trajectories(demo: DemoData, directory: str | Path
                      ) -> tuple[list[Trajectory], list[Trajectory], ExperiencePool]:
    """``(train, eval, pool)``: built under ``directory`` on first use, reloaded afterwards."""
    directory = Path(directory)
    paths = {split: directory / f"{split}.jsonl" for split in ("train", "eval")}
    pool_path = directory / "pool.jsonl"
    if all(p.exists() for p in paths.values()) and pool_path.exists():
        return read_trajectories(paths["train"]), read_trajectories(paths["eval"]), read_pool(pool_path)

    rate = demo.mistake_rate
    mistakes = Mistakes(answer_early=rate, wrong_link=rate, skip_hop=rate)
    rollouts = {}
    for split, per_level in (("train", demo.train_tasks_per_level), ("eval", demo.eval_tasks_per_level)):
        env = SimWebEnv(SimWebConfig(seed=demo.seed, split=split, tasks_per_level=per_level, levels=demo.levels))
        rollouts[split] = run_reference_agent(env, n=demo.rollouts_per_task, seed=demo.seed, mistakes=mistakes)
    pool = write_offline(group_rollouts(rollouts["train"]), ExperiencePool(),
                         OfflineWriterConfig(granularity="principle", max_pool_size=demo.max_pool_size), iteration=0)
    spec = make_injection(demo.injection, pool.as_mapping(),
                          make_selector(demo.selector, k=demo.selector_k) if demo.injection == "stepwise" else None)
    annotated = {split: annotate_injections(trajectories, spec) for split, trajectories in rollouts.items()}
    # The pool is written first and the trajectories last: a build killed midway is redone whole.
    write_pool(pool_path, pool)
    for split, trajectories in annotated.items():
        storage.write_jsonl(paths[split], (t.to_json() for t in trajectories))
    return annotated["train"], annotated["eval"], pool
