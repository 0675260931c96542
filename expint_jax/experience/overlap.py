"""Which task sets may share tasks (issue 12, item 10): extraction, teacher and evaluation.

Instance lessons are concrete notes about their own extraction task and can state its answer
("the founding year, 1923, is on the society's about page"). That decides the rule:

  * evaluation is disjoint from extraction and from teacher tasks, always: the pool (at inference
    with global or step-wise injection) and the distilled weights must never have seen an
    evaluation answer;
  * extraction and teacher tasks may coincide for ``principle`` pools (principle lessons carry no
    answers, and the release rolls its teacher out on its training queries);
  * for ``instance`` pools they must be disjoint: a teacher rolling out on an extraction task with
    that task's lesson injected can copy the answer, its trajectory is accepted as correct, and
    the student learns to produce an answer it was never shown how to find.
    ``allow_instance_overlap=True`` lifts this for a run that wants exactly that setup.

``check_task_overlap`` raises ``TaskOverlapError`` naming the sets and up to ten shared ids; the
loop's task split is meant to call it once the three sets are known.
"""

from __future__ import annotations

from collections.abc import Iterable

from expint_jax.experience.bank import check_granularity


class TaskOverlapError(ValueError):
    """Two task sets share tasks the rule keeps apart; the message names the sets and the ids."""


def _shared(a: Iterable[str], b: Iterable[str]) -> list[str]:
    return sorted(set(a) & set(b))


def check_task_overlap(extraction: Iterable[str], teacher: Iterable[str], evaluation: Iterable[str], *,
                       granularity: str, allow_instance_overlap: bool = False) -> None:
    """Raises ``TaskOverlapError`` when the task ids break the rule of the module docstring."""
    check_granularity(granularity, "check_task_overlap granularity")
    extraction, teacher, evaluation = (list(map(str, s)) for s in (extraction, teacher, evaluation))
    pairs = [("evaluation", "extraction", _shared(evaluation, extraction)),
             ("evaluation", "teacher", _shared(evaluation, teacher))]
    if granularity == "instance" and not allow_instance_overlap:
        pairs.append(("extraction", "teacher", _shared(extraction, teacher)))
    problems = [f"{a} and {b} tasks share {len(ids)} ids ({', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''})"
                for a, b, ids in pairs if ids]
    if problems:
        why = " Instance lessons can state their extraction task's answer." if granularity == "instance" else ""
        raise TaskOverlapError("; ".join(problems) + "." + why)
