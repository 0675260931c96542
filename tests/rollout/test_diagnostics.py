"""Rollout diagnostics: accuracy, zero-tool answers, turns, tool calls, terminations."""

import pytest

from expint_jax.records import TERMINATIONS, Message, Trajectory
from expint_jax.rollout.diagnostics import diagnose


def trajectory(turns, tool_calls, termination="answer", reward=None):
    messages = [Message("system", "s"), Message("user", "q")]
    for _ in range(turns):
        messages += [Message("assistant", "a"), Message("user", "obs")]
    return Trajectory("t", tuple(messages), termination=termination, num_tool_calls=tool_calls, reward=reward)


def test_diagnose():
    report = diagnose(
        [
            trajectory(1, 0, reward=1.0),  # answered without a tool
            trajectory(3, 2, reward=0.0),
            trajectory(4, 4, "max_calls", reward=0.0),
            trajectory(2, 0, "no_action"),  # unscored, no tool, but did not answer
        ]
    )
    assert report.num_trajectories == 4 and report.num_scored == 3
    assert report.accuracy == pytest.approx(1 / 3)
    assert report.zero_tool_answer_rate == 0.25
    assert report.mean_assistant_turns == 2.5 and report.mean_tool_calls == 1.5
    assert dict(report.terminations) == {t: {"answer": 2, "max_calls": 1, "no_action": 1}.get(t, 0) for t in TERMINATIONS}
    assert report.to_json()["terminations"]["answer"] == 2


def test_unscored_and_empty():
    assert diagnose([trajectory(1, 1)]).accuracy is None
    with pytest.raises(ValueError, match="at least one trajectory"):
        diagnose([])
