"""Evaluation metrics of one policy in one mode, as a pure function of its judged rollouts.

``evaluate(trajectories, samples=n, levels=..., count_tokens=...)`` over ``n`` rollouts per task:
  * ``accuracy``: the mean reward over every rollout (the paper's Avg. Pass@n);
  * ``pass_at_n``: the share of tasks with at least one correct rollout (reward >= 0.5);
  * ``best_single``: the best accuracy of any one sample index j (rollout j of every task), i.e.
    the best of n single-pass evaluations;
  * ``per_sample_accuracy``: the accuracy of each sample index j, in order (the release's
    per-round Pass@1; ``best_single`` is its maximum, ``accuracy`` its mean);
  * ``premature_answer_rate``: the share of rollouts that answered without any tool call (the
    collapse symptom of global injection);
  * ``mean_assistant_turns``, ``mean_tool_calls``, ``mean_assistant_tokens`` (tokens of the
    assistant turns, by ``count_tokens``), ``terminations`` (count per reason, all reasons listed);
  * ``by_level``: the same figures per difficulty level when ``levels`` maps task ids to one.
Rollouts must come task-major with exactly ``n`` per task (what ``ReActAgent.run_batch`` returns);
anything else is an error, as is an empty list or an unscored rollout.

Against the release's evaluator (``evaluation/judge/evaluate_deepsearch_official.py``, three
rounds): Avg. Pass@3 = ``accuracy``, Best Pass@1 = ``best_single``, Pass@3 = ``pass_at_n``,
Round-j Pass@1 = ``per_sample_accuracy[j]``, with n = 3 and 0/1 rewards from an ``LLMJudge``.
Differences, all of presentation or bookkeeping: the release reports percentages rounded to two
decimals (we keep fractions); it groups rounds by question text (we by task id, so two tasks with
the same question stay two tasks); it counts a round correct only for a "Correct" judgement,
where ``accuracy`` and the per-sample figures average the reward (the same thing for 0/1 rewards).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from expint_jax.records import Trajectory
from expint_jax.rollout.diagnostics import diagnose

CORRECT = 0.5  # a reward at or above this is a correct answer (SimWeb and exact match give 0 or 1)


def _by_task(trajectories: Sequence[Trajectory], samples: int) -> dict[str, list[Trajectory]]:
    groups: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        groups.setdefault(t.task_id, []).append(t)
    wrong = {task: len(g) for task, g in groups.items() if len(g) != samples}
    if wrong:
        raise ValueError(f"evaluate: expected {samples} rollouts per task, got {dict(list(wrong.items())[:5])}")
    return groups


def evaluate(trajectories: Sequence[Trajectory], *, samples: int, levels: Mapping[str, str] | None = None,
             count_tokens: Callable[[str], int] = lambda text: len(text.split())) -> dict[str, Any]:
    """The metrics of the module docstring (a JSON-ready dict)."""
    if not trajectories:
        raise ValueError("evaluate: no rollouts to evaluate")
    unscored = [t.task_id for t in trajectories if t.reward is None]
    if unscored:
        raise ValueError(f"evaluate: {len(unscored)} rollouts have no reward (first: task {unscored[0]!r})")
    result = _metrics(trajectories, samples, count_tokens)
    if levels:
        by_level: dict[str, list[Trajectory]] = {}
        for t in trajectories:
            by_level.setdefault(levels.get(t.task_id, "unknown"), []).append(t)
        result["by_level"] = {level: _metrics(group, samples, count_tokens) for level, group in sorted(by_level.items())}
    return result


def _metrics(trajectories: Sequence[Trajectory], samples: int, count_tokens: Callable[[str], int]) -> dict[str, Any]:
    groups = _by_task(trajectories, samples)
    diagnostics = diagnose(trajectories)
    per_sample = [sum(g[j].reward for g in groups.values()) / len(groups) for j in range(samples)]
    tokens = [sum(count_tokens(m.content) for m in t.messages if m.role == "assistant") for t in trajectories]
    return {
        "tasks": len(groups),
        "rollouts": len(trajectories),
        "accuracy": diagnostics.accuracy,
        "pass_at_n": sum(any(t.reward >= CORRECT for t in g) for g in groups.values()) / len(groups),
        "best_single": max(per_sample),
        "per_sample_accuracy": per_sample,
        "premature_answer_rate": diagnostics.zero_tool_answer_rate,
        "mean_assistant_turns": diagnostics.mean_assistant_turns,
        "mean_tool_calls": diagnostics.mean_tool_calls,
        "mean_assistant_tokens": sum(tokens) / len(tokens),
        "terminations": dict(diagnostics.terminations),
    }
