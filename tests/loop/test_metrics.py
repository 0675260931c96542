"""Evaluation metrics from judged rollouts: Avg. Pass@n, pass@n, best single pass, collapse signs."""

import pytest

from expint_jax.loop.metrics import evaluate
from expint_jax.records import Message, Trajectory


def _rollout(task, reward, tools=1, level="easy"):
    messages = [Message("system", "s"), Message("user", "q")]
    for _ in range(tools):
        messages += [Message("assistant", "<tool_call>x</tool_call>"), Message("user", "<tool_response>r</tool_response>")]
    messages.append(Message("assistant", "one two three <answer>a</answer>"))
    return Trajectory(task, tuple(messages), num_tool_calls=tools, prediction="a", reward=reward,
                      metadata={"level": level})


def test_metrics_over_n_samples_per_task():
    # task a: right, wrong; task b: wrong, wrong (answered with no tool call once); task c: right, right
    rollouts = [_rollout("a", 1.0), _rollout("a", 0.0), _rollout("b", 0.0, tools=0), _rollout("b", 0.0),
                _rollout("c", 1.0, level="hard"), _rollout("c", 1.0, level="hard")]
    m = evaluate(rollouts, samples=2, levels={"a": "easy", "b": "easy", "c": "hard"})
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["pass_at_n"] == pytest.approx(2 / 3)
    assert m["best_single"] == pytest.approx(2 / 3)  # sample 0: a and c right; sample 1: c only
    assert m["premature_answer_rate"] == pytest.approx(1 / 6)
    assert m["mean_tool_calls"] == pytest.approx(5 / 6)
    assert m["mean_assistant_turns"] == pytest.approx(11 / 6)
    assert m["terminations"]["answer"] == 6
    assert m["by_level"]["hard"]["accuracy"] == 1.0 and m["by_level"]["easy"]["tasks"] == 2
    assert m["mean_assistant_tokens"] > 0


def test_wrong_shapes_are_errors():
    with pytest.raises(ValueError, match="no rollouts"):
        evaluate([], samples=1)
    with pytest.raises(ValueError, match="expected 2 rollouts per task"):
        evaluate([_rollout("a", 1.0)], samples=2)
    with pytest.raises(ValueError, match="have no reward"):
        evaluate([_rollout("a", None)], samples=1)


def _release_metrics(rounds):
    """The release evaluator's formulas, restated: ``rounds[j][task]`` is round j's verdict."""
    tasks = list(rounds[0])
    per_round = [sum(r[t] for t in tasks) / len(tasks) for r in rounds]
    return {"avg_pass_at_3": sum(per_round) / len(rounds), "best_pass_at_1": max(per_round),
            "pass_at_3": sum(any(r[t] for r in rounds) for t in tasks) / len(tasks), "per_round": per_round}


def test_metrics_match_the_release_evaluator_over_three_rounds():
    rounds = [{"a": 1, "b": 0, "c": 0, "d": 1}, {"a": 0, "b": 0, "c": 1, "d": 1}, {"a": 1, "b": 0, "c": 0, "d": 0}]
    rollouts = [_rollout(task, float(rounds[j][task])) for task in "abcd" for j in range(3)]
    m = evaluate(rollouts, samples=3)
    release = _release_metrics(rounds)
    assert m["per_sample_accuracy"] == pytest.approx(release["per_round"]) == [0.5, 0.5, 0.25]
    assert m["accuracy"] == pytest.approx(release["avg_pass_at_3"])
    assert m["best_single"] == pytest.approx(release["best_pass_at_1"])
    assert m["pass_at_n"] == pytest.approx(release["pass_at_3"]) == 0.75
