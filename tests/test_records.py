"""Records: JSON round trips and errors that name the field and the source."""

import json

import pytest

from expint_jax.records import Message, RecordError, SamplingParams, Trajectory, read_trajectories


def _trajectory(**overrides):
    base = dict(task_id="t1", messages=(Message("system", "s"), Message("user", "q"), Message("assistant", "a")),
                injection="stepwise", step_injections=("\n\nX",), step_experience_ids=(("G0",),), reward=1.0)
    base.update(overrides)
    return Trajectory(**base)


def test_trajectory_round_trips_through_json(tmp_path):
    trajectory = _trajectory(metadata={"llm_calls": 3})
    assert Trajectory.from_json(json.loads(json.dumps(trajectory.to_json()))) == trajectory
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(trajectory.to_json()) + "\n\n" + json.dumps(trajectory.to_json()) + "\n")
    assert read_trajectories(path) == [trajectory, trajectory]


def test_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps(_trajectory().to_json())
    path.write_text(good + "\n" + good.replace('"reward": 1.0', '"reward": "high"') + "\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:2: field 'reward': expected a number"):
        read_trajectories(path)
    path.write_text("{not json\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:1: not valid JSON"):
        read_trajectories(path)


def test_invalid_records_are_refused():
    with pytest.raises(RecordError, match="2 step_injections for 1 assistant turns"):
        _trajectory(step_injections=("a", "b"))
    with pytest.raises(RecordError, match="termination 'crashed'"):
        _trajectory(termination="crashed")
    with pytest.raises(RecordError, match="release_format.messages_from_release"):
        Message.from_json({"role": "tool", "content": "R"})
    with pytest.raises(RecordError, match="missing"):
        Message.from_json({"content": "x"}, where="f.jsonl:3")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
