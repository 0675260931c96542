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
