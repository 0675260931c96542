"""The release's rollout and stats formats: import of the examples, conversion rules, errors."""

import json

import pytest

from expint_jax.experience.extract import group_rollouts
from expint_jax.experience.release_format import (
    ReleaseFormatError,
    StepStats,
    dump_release_pool,
    dump_release_stats,
    messages_from_release,
    parse_release_pool,
    parse_release_stats,
    read_release_rollouts,
    rollout_stats,
    trajectories_from_release,
)
from expint_jax.models.chat import parse_tool_call
from expint_jax.records import Trajectory
from tests.experience.trajectories import simweb_rollouts


def test_release_rollouts_import(release_file):
    path = release_file("official_rollout_example.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    trajectories = read_release_rollouts(path)
    assert [t.task_id for t in trajectories] == [str(r["id"]) for r in records]
    for trajectory, record in zip(trajectories, records):
        raw = record["trajectories"][0]["trajectory"]
        assert trajectory.reward == record["reward"] and trajectory.ground_truth == record["groundtruth"]
        assert trajectory.prediction == record["response"]
        # The experience-laden prompt is replaced by the bare problem and kept aside.
        assert trajectory.messages[0].content == record["problem"]
        assert trajectory.metadata["release_prompt"] == record["prompt"]
        assert "ACCUMULATED EXPERIENCES" not in "".join(m.content for m in trajectory.messages)
        calls = [c for m in raw for c in m.get("tool_calls") or []]
        assert trajectory.num_tool_calls == len(calls) > 0
        parsed = [parse_tool_call(m.content) for m in trajectory.messages if "<tool_call>" in m.content]
        assert [(p.name, dict(p.arguments)) for p in parsed] == [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
        responses = [m for m in trajectory.messages if m.content.startswith("<tool_response>")]
        assert [m.role for m in responses] == ["user"] * sum(m["role"] == "tool" for m in raw)
        # The converted record survives our own JSON round trip.
        assert Trajectory.from_json(json.loads(json.dumps(trajectory.to_json()))) == trajectory
    assert [g.task_id for g in group_rollouts(trajectories)] == ["3", "52"]


def test_tool_messages_in_a_row_share_one_user_turn():
    messages = messages_from_release([
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Two lookups.", "tool_calls": [
            {"function": {"name": "search", "arguments": '{"query": "a"}'}},
            {"function": {"name": "visit", "arguments": {"url": "https://x.example.org"}}}]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
        {"role": "assistant", "content": None},
    ], "test")
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1].content == (
        'Two lookups.\n<tool_call>\n{"name": "search", "arguments": {"query": "a"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "visit", "arguments": {"url": "https://x.example.org"}}\n</tool_call>')
    assert messages[2].content == "<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>"
    assert messages[3].content == ""


@pytest.mark.parametrize("record, match", [
    ([], "expected a JSON object"),
    ({"problem": "p", "trajectories": []}, "key 'id'"),
    ({"id": 1, "problem": "p", "trajectories": [{"trajectory": [{"role": "robot"}]}]}, r"trajectory\[0\].*'robot'"),
    ({"id": 1, "problem": "p", "trajectories": [{"trajectory": [
        {"role": "assistant", "tool_calls": [{"function": {"name": "s", "arguments": "{bad"}}]}]}]},
     r"tool_calls\[0\]: function.arguments is not valid JSON"),
    ({"id": 1, "problem": "p", "reward": "1", "trajectories": []}, "'reward'"),
])
def test_malformed_rollout_records_name_the_place(record, match):
    with pytest.raises(ReleaseFormatError, match=match) as info:
        trajectories_from_release(record, "rollouts.jsonl:7")
    assert "rollouts.jsonl:7" in str(info.value)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1, "problem": "p", "trajectories": []}\n{oops\n')
    with pytest.raises(ReleaseFormatError, match=r"r.jsonl:2: not valid JSON"):
        read_release_rollouts(path)


def test_release_stats_round_trip(release_file):
    text = release_file("official_stats_example.json").read_text()
    steps = parse_release_stats(text)
    assert len(steps) == 75 and steps["step_0"] == StepStats(0, 0, True, 0.5, 0.75, 5, 1.7)
    assert json.loads(dump_release_stats(steps)) == json.loads(text)


def test_rollout_stats_in_the_release_shape():
    groups = [g.trajectories for g in group_rollouts(simweb_rollouts())]
    stats = rollout_stats(groups, epoch=1, batch=4)
    # Rewards: founding 1,0,0; capital 1,1,1; director 1,0,0 -> 5/9; every task solved once.
    assert stats.to_json() == {"epoch": 1, "batch": 4, "complete": True, "rollout": {
        "avg_reward": 5 / 9, "Pass@3": 1.0, "avg_tool_call": sum(t.num_tool_calls for g in groups for t in g) / 9}}
    with pytest.raises(ReleaseFormatError, match="no reward"):
        rollout_stats([[Trajectory(task_id="x", messages=())]], epoch=0, batch=0)


def test_stats_errors_name_the_step():
    bad = json.dumps({"step_0": {"epoch": 0, "batch": 0, "complete": True, "rollout": {"avg_reward": 1}}})
    with pytest.raises(ReleaseFormatError, match=r"step_0.rollout: expected exactly one 'Pass@<n>'"):
        parse_release_stats(bad, "stats.json")
    with pytest.raises(ReleaseFormatError, match="'step-1' is not of the form"):
        parse_release_stats('{"step-1": {}}')


def test_pool_text_format_is_the_release_writer():
    mapping = {"G0": "naïve — unicode kept", "G1": "b"}
    text = dump_release_pool(mapping)
    assert text == '{\n  "G0": "naïve — unicode kept",\n  "G1": "b"\n}'
    assert parse_release_pool(text) == mapping
