"""The five extraction stages. Each reads its inputs, asks the LLM, and persists what it got.

Work-directory layout (every file written atomically; a file that exists is never recomputed):

    summaries/<task>/<k>.json       one rollout summary            {"summary", "fallback"}
    critiques/<task>.json           one group's proposed lessons   {"lessons", "fallback"}
    group_updates/<task>.json       operations for one group's lessons (``group_update="per_query"``)
                                                                   {"proposals", "operations", "fallback"}
    group_updates/<task>/<j>.json   operations for one proposal (``group_update="per_lesson"``)
                                                                   {"proposal", "operations", "fallback"}
    reconcile.json                  the reconciled operations      {"operations", "fallback"}
    consolidated_pool.jsonl         the pool after consolidation (only when reconcile left it over the cap)

``<task>`` is a filesystem-safe slug of the task id plus a hash of it. A stage file that does not
read back as its stage wrote it (bad JSON, a missing or mistyped key, a malformed operation or
pool, reconciled operations that do not fit the pool) was damaged outside the pipeline, since
every write is atomic: it is logged and counted (fallback ``cache_damaged_redone``) and its item
is computed again, overwriting it.

Fallbacks when a request fails every retry (each logged and counted under its kind, see
``stats.FALLBACKS``):

    summary      -> a digest of the trajectory's own text (outcome, agent turns clipped)
    critique     -> no lessons from that group
    group update -> each proposal becomes a plain ADD
    reconcile    -> the deterministic rules of ``operations.reconcile`` on all operations
    consolidate  -> truncation to ``max_pool_size``: ``truncation="first"`` (the release) keeps the
                    first items in pool order; ``"new_first"`` uses
                    ``ExperiencePool.truncated(max_pool_size, previous=<input pool>)``: this run's
                    additions and rewrites first, then the input pool's unchanged items (the
                    previous iteration's pool, already internalized), each in pool order

One more guard: a reconcile answer that keeps none of the proposed ADD/UPDATE operations (``[]``,
only ``NONE``, only ``DELETE``s) is not applied; the deterministic rules run on all operations
instead (fallback ``reconcile_dropped_all``). Group update already judged each proposal worth
writing (a lesson already covered became ``NONE`` there), so the reconcile's job is to merge and
deduplicate; an answer dropping every proposal is far likelier lazy or cut off than a judgement.

Items this pipeline writes carry ``writer=WRITER``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from expint_jax import storage
from expint_jax.experience.bank import ExperiencePool, read_pool, text_key, write_pool
from expint_jax.experience.extract import parsers, prompts
from expint_jax.experience.extract.calls import Ask, AskPolicy, ask_all
from expint_jax.experience.extract.config import ExtractionConfig
from expint_jax.experience.extract.groups import RolloutGroup
from expint_jax.experience.extract.operations import Operation, apply_operations, reconcile
from expint_jax.experience.extract.stats import RunStats
from expint_jax.records import Trajectory
from expint_jax.llm.base import ChatBackend

DIGEST_TURN_CHARS = 300
WRITER = "llm_extraction"  # ``ExperienceItem.writer`` of the lessons this pipeline writes
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What every stage of one run shares."""

    backend: ChatBackend
    config: ExtractionConfig
    workdir: Path
    stats: RunStats
    iteration: int | None

    @property
    def style(self) -> prompts.LessonStyle:
        return prompts.style(self.config.granularity)

    @property
    def policy(self) -> AskPolicy:
        return AskPolicy(self.config.sampling, self.config.max_retries, self.config.concurrency)

    def cached(self, relative: str, stage: str, read: Callable[[Path], T]) -> T | None:
        """``read(path)`` of a stage output on disk; ``None`` when it is missing or damaged (see above)."""
        path = self.workdir / relative
        if not path.exists():
            return None
        try:
            value = read(path)
        except ValueError as e:  # storage.read_json, the readers below and read_pool all raise ValueError
            self.stats.fallback("cache_damaged_redone", f"{path}: {e}")
            return None
        self.stats.cached[stage] += 1
        return value

    def save(self, relative: str, obj: Any) -> None:
        storage.write_json(self.workdir / relative, obj)


def _read_field(path: Path, name: str, kind: type) -> Any:
    obj = storage.read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get(name), kind):
        raise ValueError(f"key {name!r} must be a {kind.__name__}")
    return obj[name]


def _read_summary(path: Path) -> str:
    summary = _read_field(path, "summary", str)
    if not summary.strip():
        raise ValueError("key 'summary' is empty")
    return summary


def _read_lessons(path: Path) -> list[str]:
    lessons = _read_field(path, "lessons", list)
    if not all(isinstance(lesson, str) and lesson.strip() for lesson in lessons):
        raise ValueError("key 'lessons' must be a list of non-empty strings")
    return lessons


def _read_operations(path: Path) -> list[Operation]:
    return [Operation.from_json(o, f"operation {k}") for k, o in enumerate(_read_field(path, "operations", list))]


def task_slug(task_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", task_id).strip("._")[:40] or "task"
    return f"{safe}-{hashlib.sha1(task_id.encode('utf-8')).hexdigest()[:8]}"


def trajectory_digest(trajectory: Trajectory) -> str:
    """The summary fallback: the rollout's own text, clipped, with its outcome."""
    steps = prompts.render_trajectory(trajectory, DIGEST_TURN_CHARS)
    return (f"(automatic digest; no summary available) Outcome: {prompts.outcome(trajectory)}. "
            f"Answer: {trajectory.prediction or '(no answer)'}.\n{steps}")


def summarize(run: StageRun, groups: Sequence[RolloutGroup]) -> dict[str, list[str]]:
    """task id -> one summary per rollout, in rollout order."""
    stage = "summary"
    found: dict[str, str] = {}
    asks: list[Ask] = []
    rollouts: dict[str, Trajectory] = {}
    for group in groups:
        for k, trajectory in enumerate(group.trajectories):
            key = f"summaries/{task_slug(group.task_id)}/{k}.json"
            rollouts[key] = trajectory
            cached = run.cached(key, stage, _read_summary)
            if cached is not None:
                found[key] = cached
            else:
                messages = prompts.summary_messages(group.question, trajectory, run.config.max_message_chars,
                                                    run.config.summary)
                asks.append(Ask(key, messages))

    def keep(key: str, summary: str) -> None:
        run.save(key, {"task_id": rollouts[key].task_id, "summary": summary, "fallback": False})
        found[key] = summary

    failed = ask_all(run.backend, asks, _non_empty, keep, stage=stage, policy=run.policy, stats=run.stats)
    for key, reason in failed.items():
        run.stats.fallback("summary_from_trajectory", f"{key}: {reason}")
        digest = trajectory_digest(rollouts[key])
        run.save(key, {"task_id": rollouts[key].task_id, "summary": digest, "fallback": True})
        found[key] = digest
    return {
        g.task_id: [found[f"summaries/{task_slug(g.task_id)}/{k}.json"] for k in range(len(g.trajectories))]
        for g in groups
    }


def _non_empty(text: str) -> str:
    text = text.strip()
    if not text:
        raise parsers.ParseError("empty answer")
    return text


def critique(run: StageRun, groups: Sequence[RolloutGroup], summaries: dict[str, list[str]],
             pool: ExperiencePool) -> dict[str, list[str]]:
    """task id -> proposed lessons."""
    stage = "critique"
    found: dict[str, list[str]] = {}
    asks: list[Ask] = []
    task_of: dict[str, str] = {}
    for group in groups:
        key = f"critiques/{task_slug(group.task_id)}.json"
        task_of[key] = group.task_id
        cached = run.cached(key, stage, _read_lessons)
        if cached is not None:
            found[group.task_id] = cached
            continue
        labelled = [(prompts.outcome(t), s) for t, s in zip(group.trajectories, summaries[group.task_id])]
        shown_pool = pool.as_mapping() if run.config.critique_sees_pool else None
        messages = prompts.critique_messages(group.question, group.reference, labelled, shown_pool,
                                             run.style, run.config.max_lessons_per_group)
        asks.append(Ask(key, messages))

    def keep(key: str, lessons: list[str]) -> None:
        run.save(key, {"task_id": task_of[key], "lessons": lessons, "fallback": False})
        found[task_of[key]] = lessons

    limit = run.config.max_lessons_per_group
    failed = ask_all(run.backend, asks, lambda text: parsers.parse_experiences(text, limit), keep,
                     stage=stage, policy=run.policy, stats=run.stats)
    for key, reason in failed.items():
        run.stats.fallback("critique_no_lessons", f"{task_of[key]}: {reason}")
        run.save(key, {"task_id": task_of[key], "lessons": [], "fallback": True})
        found[task_of[key]] = []
    return {g.task_id: found[g.task_id] for g in groups}


def group_update(run: StageRun, lessons: dict[str, list[str]], pool: ExperiencePool) -> list[Operation]:
    """Operations proposed for every lesson, each tagged with the task it came from.

    ``group_update="per_query"``: one request per task covering all its lessons (the release);
    ``"per_lesson"``: one request per lesson. Either way a failed request's lessons become ADDs.
    """
    stage = "group_update"
    found: dict[str, list[Operation]] = {}
    asks: list[Ask] = []
    origin: dict[str, tuple[str, tuple[str, ...]]] = {}  # key -> (task id, the proposals it decides on)
    per_query = run.config.group_update == "per_query"
    for task_id, proposals in lessons.items():
        slug = task_slug(task_id)
        if per_query:
            units = [(f"group_updates/{slug}.json", tuple(proposals))] if proposals else []
        else:
            units = [(f"group_updates/{slug}/{j}.json", (proposal,)) for j, proposal in enumerate(proposals)]
        for key, decided in units:
            origin[key] = (task_id, decided)
            cached = run.cached(key, stage, _read_operations)
            if cached is not None:
                found[key] = cached
            else:
                subject = list(decided) if per_query else decided[0]
                asks.append(Ask(key, prompts.group_update_messages(subject, pool.as_mapping(), run.style)))

    def record(key: str, operations: list[Operation], fallback: bool) -> None:
        task_id, decided = origin[key]
        subject = {"proposals": list(decided)} if per_query else {"proposal": decided[0]}
        run.save(key, {"task_id": task_id, **subject, "fallback": fallback,
                       "operations": [op.to_json() for op in operations]})
        found[key] = operations

    def keep(key: str, parsed: parsers.ParsedOperations) -> None:
        for problem in parsed.rejected:
            run.stats.fallback("invalid_operation_dropped", f"{key}: {problem}")
        record(key, [op.with_sources([origin[key][0]]) for op in parsed.operations], False)

    failed = ask_all(run.backend, asks, parsers.parse_operations, keep, stage=stage, policy=run.policy,
                     stats=run.stats)
    for key, reason in failed.items():
        task_id, decided = origin[key]
        run.stats.fallback("group_update_as_add", f"{key}: {reason}")
        record(key, [Operation("ADD", None, proposal, (task_id,)) for proposal in decided], True)
    return [op for key in origin for op in found[key]]


def batch_reconcile(run: StageRun, operations: Sequence[Operation], pool: ExperiencePool) -> ExperiencePool:
    """One LLM call merges all operations; the deterministic rules then make them consistent."""
    stage = "reconcile"
    key = "reconcile.json"

    def read(path: Path) -> list[Operation]:
        # What this stage saves is reconcile's output, a fixed point of reconcile for this pool.
        saved = _read_operations(path)
        if reconcile(saved, pool)[0] != tuple(saved):
            raise ValueError("the operations are not consistent with the pool (unknown ids, repeats or conflicts)")
        return saved

    cached = run.cached(key, stage, read)
    if cached is not None:
        return _apply(run, pool, cached)
    proposed = [op for op in operations if op.kind != "NONE"]
    result: dict[str, tuple[Operation, ...]] = {}
    fallback = False
    if proposed:
        listing = [{k: v for k, v in op.to_json().items() if k != "source_task_ids"} for op in proposed]
        messages = prompts.reconcile_messages(listing, pool.as_mapping(), run.style, run.config.max_pool_size)

        def keep(_: str, parsed: parsers.ParsedOperations) -> None:
            for problem in parsed.rejected:
                run.stats.fallback("invalid_operation_dropped", f"{key}: {problem}")
            result[key] = tuple(_with_provenance(op, proposed) for op in parsed.operations)

        failed = ask_all(run.backend, [Ask(key, messages)], parsers.parse_operations, keep, stage=stage,
                         policy=run.policy, stats=run.stats)
        if failed:
            run.stats.fallback("reconcile_deterministic", failed[key])
            fallback = True
        elif _writes(proposed) and not _writes(result[key]):  # see the module docstring
            answered = result.pop(key)
            run.stats.fallback("reconcile_dropped_all", f"the answer keeps none of the {_writes(proposed)} "
                               f"proposed ADD/UPDATE operations ({len(answered)} operations answered)")
            fallback = True
    final, notes = reconcile(result.get(key, tuple(proposed)), pool)
    for note in notes:
        run.stats.note(note.kind, note.detail)
    run.save(key, {"operations": [op.to_json() for op in final], "fallback": fallback})
    return _apply(run, pool, final)


def _writes(operations: Sequence[Operation]) -> int:
    return sum(op.kind in ("ADD", "UPDATE") for op in operations)


def _apply(run: StageRun, pool: ExperiencePool, operations: Sequence[Operation]) -> ExperiencePool:
    return apply_operations(pool, operations, granularity=run.config.granularity, iteration=run.iteration,
                            writer=WRITER)


def _with_provenance(op: Operation, proposed: Sequence[Operation]) -> Operation:
    """Sources of a reconciled operation: those of the proposals on the same id or with the same text."""
    key = text_key(op.content or "")
    sources = [s for p in proposed
               if (op.target_id is not None and p.target_id == op.target_id) or (key and text_key(p.content or "") == key)
               for s in p.source_task_ids]
    return op.with_sources(sources)


def consolidate(run: StageRun, pool: ExperiencePool, previous: ExperiencePool) -> ExperiencePool:
    """Brings ``pool`` (edited from ``previous``, the run's input) back under the cap.

    The LLM rewrites it; fallback: truncation by ``config.truncation`` (the first items, or this
    run's new and rewritten lessons first).
    """
    stage = "consolidate"
    key = "consolidated_pool.jsonl"
    cap = run.config.max_pool_size
    cached = run.cached(key, stage, read_pool)
    if cached is not None:
        return cached
    result: dict[str, ExperiencePool] = {}

    def parse(text: str) -> list[tuple[str | None, str]]:
        entries: dict[str, tuple[str | None, str]] = {}
        for source, lesson in parsers.parse_pool_rewrite(text):
            entries.setdefault(text_key(lesson), (source, lesson))  # the first copy of a repeated lesson wins
        if len(entries) > cap:
            raise parsers.ParseError(f"the answer has {len(entries)} distinct lessons, the limit is {cap}")
        return list(entries.values())

    def keep(_: str, entries: list[tuple[str | None, str]]) -> None:
        result[key] = pool.rewritten(entries, granularity=run.config.granularity, iteration=run.iteration,
                                     writer=WRITER)

    messages = prompts.consolidate_messages(pool.as_mapping(), run.style, cap)
    failed = ask_all(run.backend, [Ask(key, messages)], parse, keep, stage=stage, policy=run.policy, stats=run.stats)
    if failed:
        run.stats.fallback("consolidate_truncate", f"{len(pool)} items cut to {cap}: {failed[key]}")
        keep_new = run.config.truncation == "new_first"
        result[key] = pool.truncated(cap, previous=previous if keep_new else None)
    write_pool(run.workdir / key, result[key])
    return result[key]
