"""ReActAgent on the real LocalEngine: a tiny random Qwen3 with the offline Qwen3 tokenizer, on SimWeb.

A random model writes gibberish, so this checks the machinery, not the answers: trajectories are
well-formed, step-wise injections reach the engine but never the stored history, the engine's
exact token counter keeps every request within the agent's budget, and a prompt the engine
refuses (too long for its own context) ends in one forced-answer request, never in empty turns.
"""

import pytest
from flax import nnx

from expint_jax.experience.inject import EXPERIENCE_HEADER, StepwiseInjection, context_before_turn, inject
from expint_jax.experience.select import BM25Selector
from expint_jax.models.config import tiny
from expint_jax.models.qwen3 import Qwen3
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.records import TERMINATIONS, Message, SamplingParams
from expint_jax.rollout import prompts
from expint_jax.rollout.agent import AgentConfig, ReActAgent
from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
from expint_jax.llm.local import LocalEngine

POOL = {
    "G0": "When a search result is the entity's own page, visit it before answering.",
    "G1": "When a question names a site, start from its root URL and follow the links.",
    "G2": "When two values must be compared, read both pages before computing.",
    "G3": "When the answer is a number, give only the number.",
}
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def engine():
    model = Qwen3(tiny(), rngs=nnx.Rngs(0))
    return LocalEngine(model, load_tokenizer(None), max_batch_size=4)


@pytest.fixture(scope="module")
def env():
    return SimWebEnv(SimWebConfig(seed=3, tasks_per_level=1))


def agent_config(max_context_tokens: int = 28 * 1024) -> AgentConfig:
    return AgentConfig(max_llm_calls=3, max_no_action_turns=2, max_context_tokens=max_context_tokens,
                       sampling=SamplingParams(temperature=0.7, max_tokens=MAX_TOKENS))


def check_well_formed(trajectories, count_tokens, config):
    for traj in trajectories:
        assert traj.termination in TERMINATIONS and traj.injection == "stepwise"
        roles = [m.role for m in traj.messages]
        assert roles[:2] == ["system", "user"]
        assert all(role == ("assistant" if i % 2 == 0 else "user") for i, role in enumerate(roles[2:]))
        assert all(m.content for m in traj.messages), "no empty turn is stored"
        assert not any(EXPERIENCE_HEADER in m.content for m in traj.messages)
        turns = traj.num_assistant_turns
        assert len(traj.step_experience_ids) == len(traj.step_injections) == turns
        assert traj.metadata["llm_calls"] == turns <= config.max_llm_calls
        assert traj.metadata.get("completion_tokens", 0) <= MAX_TOKENS * turns
        for k in range(turns):
            request = context_before_turn(traj, k)
            forced = request[-1].content.endswith(prompts.FORCED_ANSWER)
            # Only the forced-answer request may exceed the budget: it is sent whatever its size.
            assert forced or count_tokens(request) <= config.max_context_tokens
            assert (EXPERIENCE_HEADER in request[-1].content) == (not forced and bool(traj.step_experience_ids[k]))
            assert not forced or (k == turns - 1 and traj.termination == "max_context")


def probe_first_request_tokens(agent, tasks, env):
    """Tokens of each task's first request (system prompt, question, step-wise block)."""
    out = []
    for task in tasks:
        tools = {t.spec.name: t for t in env.tools(task)}
        history = [Message("system", agent.system_prompt(tools)), Message("user", task.question)]
        block = agent.injection.block_for(agent.injection.selector.select(history, agent.injection.pool).ids)
        out.append(agent.count_tokens(inject(history, agent.injection.system_block, block)))
    return out


def test_agent_on_the_local_engine_with_stepwise_injection(engine, env):
    tasks = env.tasks()[:3]
    injection = StepwiseInjection(POOL, BM25Selector(k=2, k_min=1))
    # A budget that every first request fits and every second one (a reply and a nudge later)
    # overflows, measured with the engine's own tokenizer and template, which the agent picks up.
    probe = ReActAgent(engine, agent_config(), injection)
    assert probe.count_tokens == engine.count_tokens
    config = agent_config(max_context_tokens=max(probe_first_request_tokens(probe, tasks, env)) + 20)
    agent = ReActAgent(engine, config, injection)
    trajectories = agent.run_batch(tasks, env, n=2, seed=0)
    assert [t.task_id for t in trajectories] == [t.task_id for t in tasks for _ in range(2)]
    check_well_formed(trajectories, engine.count_tokens, config)
    assert {t.termination for t in trajectories} <= {"max_calls", "max_context", "no_action", "answer"}
    ended_by_the_budget = [t for t in trajectories if t.termination == "max_context"]
    assert ended_by_the_budget
    for traj in ended_by_the_budget:  # its last request was the forced-answer one, and it was answered
        forced = context_before_turn(traj, traj.num_assistant_turns - 1)
        assert forced[-1].content == prompts.FORCED_ANSWER
        assert traj.metadata["context_tokens"] == engine.count_tokens(forced)
    assert all(t.reward in (0.0, 1.0) for t in trajectories)
    again = agent.run_batch(tasks, env, n=2, seed=0)  # seeded: reruns repeat
    assert [t.messages for t in again] == [t.messages for t in trajectories]


def test_prompt_the_engine_refuses_ends_in_one_forced_answer(engine, env):
    tasks = env.tasks()[:2]
    config = agent_config()
    injection = StepwiseInjection(POOL, BM25Selector(k=2, k_min=1))
    # The engine's context (not the agent's far larger budget) is what the second request
    # overflows, and the forced-answer request that replaces it as well: the engine notices.
    first = max(probe_first_request_tokens(ReActAgent(engine, config, injection), tasks, env))
    small = LocalEngine(engine.model, engine.chat_format.tokenizer, max_batch_size=4, max_context=first + 20)
    trajectories = ReActAgent(small, config, injection).run_batch(tasks, env, n=1, seed=1)
    check_well_formed(trajectories, small.count_tokens, config)
    for traj in trajectories:
        assert (traj.termination, traj.num_assistant_turns, traj.prediction) == ("max_context", 1, None)
        assert "leaves no room in the context" in traj.metadata["last_backend_error"]
        assert traj.messages[-1].content.endswith(prompts.FORCED_ANSWER)  # the request that was refused
