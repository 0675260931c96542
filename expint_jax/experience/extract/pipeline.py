"""``extract_experience``: scored rollout groups and the current pool in, the next pool out.

    summary (per rollout) -> critique (per group) -> group update (per group, or per lesson)
      -> batch reconcile (one call) -> consolidate (only when over the cap) -> renumber G0..G{n-1}

The defaults follow the public release; ``ExtractionConfig``'s docstring lists each switch.

Contract:
  * The result is always a valid pool of at most ``config.max_pool_size`` items numbered
    ``G0..G{n-1}``, whatever the LLM answers (errors, empty or malformed answers, unknown ids):
    every failure has a documented fallback (``stages``), logged and counted.
  * Resumable: every stage persists its output per item under ``workdir`` and a rerun with the
    same inputs recomputes nothing that exists; the final pool is ``workdir/pool.jsonl`` (plus the
    release's flat ``pool.json``), and once it exists a rerun returns it without any LLM call.
    ``workdir/inputs.json`` fingerprints the inputs, so a work directory cannot silently mix
    two different runs. ``workdir/stats.json`` lists each run's counters (``stats.RunStats``);
    a run that finishes adds the final pool's granularity report (``granularity.analyze_pool``)
    under ``"granularity"``.
  * Only informative groups are used when ``config.informative_groups_only`` (see ``groups``).
  * ``on_stage_done(stage)`` is called with each name of ``STAGES`` that ran, after its output is
    on disk (for progress reporting; tests raise from it to simulate a crash between stages).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from expint_jax import storage
from expint_jax.experience.bank import ExperiencePool, read_pool, write_pool
from expint_jax.experience.granularity import analyze_pool
from expint_jax.experience.extract import stages
from expint_jax.experience.extract.config import ExtractionConfig
from expint_jax.experience.extract.groups import RolloutGroup
from expint_jax.experience.extract.stats import RunStats
from expint_jax.llm.base import ChatBackend

STAGES: tuple[str, ...] = ("summary", "critique", "group_update", "reconcile", "consolidate", "final")
StageHook = Callable[[str], None]

# Settings that change what the LLM is asked; the others (retries, batch size) may change on a rerun.
_CONTENT_SETTINGS = ("granularity", "max_pool_size", "sampling", "max_lessons_per_group", "max_message_chars",
                     "informative_groups_only", "summary", "critique_sees_pool", "group_update", "truncation")


def extract_experience(
    groups: Sequence[RolloutGroup],
    pool: ExperiencePool,
    backend: ChatBackend,
    config: ExtractionConfig,
    workdir: str | Path,
    *,
    iteration: int | None = None,
    on_stage_done: StageHook | None = None,
) -> ExperiencePool:
    """Updates ``pool`` from the lessons of ``groups`` through the LLM stages; resumable in ``workdir``.

    Args:
      groups: the judged rollouts, one group per task (task ids unique).
      pool: the pool before this run (not modified).
      backend: the experience LLM.
      config: granularity, pool cap, sampling and retry settings.
      workdir: where each stage's output is stored; a rerun skips the stages already there.
      iteration: recorded in the run's claim, so a directory is never reused for another iteration.
      on_stage_done: called after each stage with its name (progress hooks).

    Returns:
      The new pool (also written to ``workdir/pool.jsonl``).
    """
    workdir = Path(workdir)
    task_ids = [g.task_id for g in groups]
    repeated = sorted({t for t in task_ids if task_ids.count(t) > 1})
    if repeated:
        raise ValueError(f"extract_experience: several groups share task ids {repeated}; merge them first")
    _claim(workdir, groups, pool, config, iteration)
    final_path = workdir / "pool.jsonl"
    if final_path.exists():
        return read_pool(final_path)

    stats = RunStats()
    run = stages.StageRun(backend, config, workdir, stats, iteration)
    stats_path = workdir / "stats.json"
    earlier_runs = storage.read_json(stats_path)["runs"] if stats_path.exists() else []

    def done(stage: str) -> None:
        storage.write_json(stats_path, {"runs": [*earlier_runs, stats.to_json()]})
        if on_stage_done is not None:
            on_stage_done(stage)

    used = [g for g in groups if g.is_informative] if config.informative_groups_only else list(groups)
    stats.info.update(groups_total=len(groups), groups_used=len(used), pool_size_before=len(pool))

    summaries = stages.summarize(run, used)
    done("summary")
    lessons = stages.critique(run, used, summaries, pool)
    done("critique")
    operations = stages.group_update(run, lessons, pool)
    done("group_update")
    updated = stages.batch_reconcile(run, operations, pool)
    done("reconcile")
    if len(updated) > config.max_pool_size:
        updated = stages.consolidate(run, updated, previous=pool)
        done("consolidate")

    final = updated.renumbered()
    if len(final) > config.max_pool_size:  # consolidate guarantees this; a violation is a bug here
        raise AssertionError(f"extraction produced {len(final)} items over the cap {config.max_pool_size}")
    write_pool(workdir / "pool.json", final)
    write_pool(final_path, final)
    stats.info["pool_size_after"] = len(final)
    stats.info["granularity"] = analyze_pool(final).to_json()
    done("final")
    return final


def _claim(workdir: Path, groups: Sequence[RolloutGroup], pool: ExperiencePool, config: ExtractionConfig,
           iteration: int | None) -> None:
    settings = {k: v for k, v in config.to_json().items() if k in _CONTENT_SETTINGS}
    material = {
        "settings": settings,
        "iteration": iteration,
        "pool": [item.to_json() for item in pool],
        "groups": [[t.to_json() for t in g.trajectories] for g in groups],
    }
    fingerprint = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    path = workdir / "inputs.json"
    if path.exists():
        previous = storage.read_json(path).get("fingerprint")
        if previous != fingerprint:
            raise ValueError(
                f"{workdir}: this work directory holds an extraction run on different inputs (groups, pool, "
                "iteration or settings); use a fresh directory or delete it"
            )
        return
    storage.write_json(path, {"fingerprint": fingerprint, "iteration": iteration, "groups": len(groups),
                              "pool_size": len(pool), "settings": settings})
