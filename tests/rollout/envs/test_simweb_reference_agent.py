"""The scripted SimWeb reference agent: solve rate per level, ReAct trajectory format, seeded mistakes."""

import collections
import json
import re

import pytest

from expint_jax.experience.inject import StepwiseInjection
from expint_jax.experience.select import AllSelector
from expint_jax.models.chat import parse_answer, parse_tool_call
from expint_jax.records import Message, SamplingParams, Trajectory
from expint_jax.rollout.agent import ReActAgent
from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv
from expint_jax.rollout.envs.simweb.reference_agent import (
    Mistakes,
    ReferenceAgent,
    ReferenceAgentConfig,
    ReferencePolicy,
    is_near_miss,
    read_facts,
    run_reference_agent,
)
from expint_jax.rollout.prompts import system_prompt


@pytest.fixture(scope="module")
def env():
    return SimWebEnv(SimWebConfig(seed=7, tasks_per_level=100))


@pytest.fixture(scope="module")
def perfect(env):
    return run_reference_agent(env)


def test_reference_agent_solves_at_least_95_percent_at_every_level(env, perfect):
    rewards = collections.defaultdict(list)
    for task, trajectory in zip(env.tasks(), perfect, strict=True):
        assert trajectory.task_id == task.task_id
        rewards[task.metadata["level"]].append(trajectory.reward)
    assert set(rewards) == {"easy", "medium", "hard"}
    for level, values in rewards.items():
        assert len(values) == 100
        assert sum(values) / len(values) >= 0.95, level


def test_harder_levels_need_more_tool_calls(env, perfect):
    calls = collections.defaultdict(list)
    for task, trajectory in zip(env.tasks(), perfect, strict=True):
        calls[task.metadata["level"]].append(trajectory.num_tool_calls)
    mean = {level: sum(v) / len(v) for level, v in calls.items()}
    assert mean["easy"] < mean["medium"] < mean["hard"], mean


_ASSISTANT_CALL = re.compile(r"^<think>\n.+\n</think>\n\n<tool_call>\n\{.*\}\n</tool_call>$", re.S)
_ASSISTANT_ANSWER = re.compile(r"^<think>\n.+\n</think>\n\n<answer>.+</answer>$", re.S)


def test_trajectories_are_in_the_exact_react_format(env, perfect):
    tools = env.tools(env.tasks()[0])
    for task, trajectory in zip(env.tasks()[::25], perfect[::25], strict=True):
        messages = trajectory.messages
        assert messages[0].role == "system" and messages[0].content == system_prompt([t.spec for t in tools])
        assert messages[1].role == "user" and messages[1].content == task.question
        turns = messages[2:]
        assert [m.role for m in turns] == ["assistant", "user"] * trajectory.num_tool_calls + ["assistant"]
        for assistant, response in zip(turns[0:-1:2], turns[1::2], strict=True):
            assert _ASSISTANT_CALL.match(assistant.content), assistant.content
            call = parse_tool_call(assistant.content)
            assert call.name in ("search", "visit") and set(call.arguments) <= {"query", "url"}
            assert response.content.startswith("<tool_response>\n") and response.content.endswith("\n</tool_response>")
        assert _ASSISTANT_ANSWER.match(turns[-1].content)
        assert parse_answer(turns[-1].content) == trajectory.prediction
        assert trajectory.termination == "answer" and trajectory.ground_truth == task.answer
        assert trajectory.metadata["agent"] == "simweb-reference"
        assert Trajectory.from_json(json.loads(json.dumps(trajectory.to_json()))) == trajectory


def test_answer_pages_are_visited_in_successful_trajectories(env, perfect):
    for task, trajectory in zip(env.tasks(), perfect, strict=True):
        visited = [parse_tool_call(m.content).arguments.get("url") for m in trajectory.messages
                   if m.role == "assistant" and "<tool_call>" in m.content]
        assert set(task.metadata["answer_urls"]) <= set(visited), task.task_id


def test_without_think_blocks_turns_hold_only_the_action(env):
    trajectory = run_reference_agent(env, env.tasks()[:1], think=False)[0]
    assert all("<think>" not in m.content for m in trajectory.messages if m.role == "assistant")
    assert trajectory.reward == 1.0


def test_mistakes_make_groups_partly_right_and_are_seeded(env):
    tasks = env.tasks()[::5]
    mistakes = Mistakes(answer_early=0.15, wrong_link=0.3, skip_hop=0.3)
    runs = run_reference_agent(env, tasks, n=5, seed=3, mistakes=mistakes)
    assert runs == run_reference_agent(env, tasks, n=5, seed=3, mistakes=mistakes)
    groups = [runs[i : i + 5] for i in range(0, len(runs), 5)]
    means = [sum(t.reward for t in group) / 5 for group in groups]
    assert 0.3 < sum(means) / len(means) < 0.9
    assert sum(0 < m < 1 for m in means) >= len(means) // 2
    made = collections.Counter(kind for t in runs for kind in t.metadata["mistakes"])
    assert set(made) == {"answer_early", "wrong_link", "skip_hop"}
    assert all(t.reward == 1.0 for t in runs if not t.metadata["mistakes"])
    early = next(t for t in runs if t.metadata["mistakes"] == ["answer_early"])
    assert early.num_tool_calls == 1  # one search, then the answer
    assert runs != run_reference_agent(env, tasks, n=5, seed=4, mistakes=mistakes)


def test_unparseable_question_gets_unknown_without_tool_calls(env):
    task = env.tasks()[0]
    odd = type(task)("odd", "What is the meaning of life?", "42", {})
    trajectory = ReferenceAgent(env).run(odd)
    assert trajectory.prediction == "unknown" and trajectory.num_tool_calls == 0 and trajectory.reward == 0.0


def test_helpers_and_validation():
    assert read_facts("intro\n- Founded: 1987\n- Director: Ada Kell\ntext: no") == {
        "Founded": "1987", "Director": "Ada Kell"}
    assert is_near_miss("Lox Sculpture Trust", "Lox Sculpture Company")
    assert not is_near_miss("Lox Sculpture", "Lox Sculpture Company")
    assert not is_near_miss("Lox Sculpture Company", "Lox Sculpture Company")
    with pytest.raises(ValueError, match="wrong_link"):
        Mistakes(wrong_link=1.5)


def test_policy_inside_the_react_agent_reproduces_the_reference_trajectories(env, perfect):
    tasks, expected = env.tasks()[::6], perfect[::6]
    got = ReActAgent(ReferencePolicy()).run_batch(tasks, env)
    for mine, theirs in zip(expected, got, strict=True):
        assert theirs.messages == mine.messages
        assert (theirs.prediction, theirs.reward, theirs.num_tool_calls) == (mine.prediction, 1.0, mine.num_tool_calls)


def test_policy_with_mistakes_gives_mixed_seeded_groups_and_ignores_injected_experience(env):
    tasks = env.tasks()[::15]
    config = ReferenceAgentConfig(mistakes=Mistakes(answer_early=0.15, wrong_link=0.3, skip_hop=0.3))
    plain = ReActAgent(ReferencePolicy(config)).run_batch(tasks, env, n=4, seed=5)
    assert [t.messages for t in plain] == [t.messages for t in ReActAgent(ReferencePolicy(config)).run_batch(
        tasks, env, n=4, seed=5)]
    means = [sum(t.reward for t in plain[i : i + 4]) / 4 for i in range(0, len(plain), 4)]
    assert any(0 < m < 1 for m in means) and 0.2 < sum(means) / len(means) < 0.95
    pool = {"G0": "When a search result is a directory page, visit it before answering."}
    injected = ReActAgent(ReferencePolicy(config), injection=StepwiseInjection(pool, AllSelector())).run_batch(
        tasks, env, n=4, seed=5)
    assert [t.messages for t in injected] == [t.messages for t in plain]
    assert all(block.endswith(pool["G0"]) for t in injected for block in t.step_injections)


def test_policy_gives_up_on_conversations_it_did_not_write():
    policy = ReferencePolicy()
    question = "According to the X website (https://x.example.org/), in what year was Y founded?"
    foreign = [Message("system", "s"), Message("user", question), Message("assistant", "I will guess."),
               Message("user", "<tool_response>\nnothing\n</tool_response>")]
    forced = [Message("system", "s"), Message("user", question), Message("assistant", "x"),
              Message("user", "Give your final answer now.")]
    replies = policy.chat([foreign, forced, [Message("system", "s")]], SamplingParams())
    assert [c.text for c in replies] == ["<answer>unknown</answer>"] * 3
