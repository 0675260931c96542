"""ReActAgent rollouts on LocalEngine give the same trajectories with the prefix cache on and off.

A tiny random Qwen3 with the offline tokenizer acts on SimWeb under step-wise injection: every
request's last user message carries an experience block that the stored history (and so the next
request) does not, so the next request shares with the cached one only a prefix that ends before
the block. The test checks that this case really occurs, that the cache served tokens, and that
greedy and seeded sampling give the same trajectories either way.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from expint_jax.experience.inject import StepwiseInjection
from expint_jax.experience.select import BM25Selector
from expint_jax.models.config import tiny
from expint_jax.models.qwen3 import Qwen3
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.records import SamplingParams
from expint_jax.rollout.agent import AgentConfig, ReActAgent
from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
from expint_jax.llm.local import LocalEngine

POOL = {
    "G0": "When a search result is the entity's own page, visit it before answering.",
    "G1": "When a question names a site, start from its root URL and follow the links.",
    "G2": "When two values must be compared, read both pages before computing.",
}


class Recording:
    """The engine, with the prompts (token ids) of every call."""

    def __init__(self, engine: LocalEngine):
        self.engine, self.calls = engine, []
        self.count_tokens = engine.count_tokens

    def chat(self, conversations, params):
        if conversations:
            self.calls.append([self.engine.chat_format.encode_prompt(messages) for messages in conversations])
        return self.engine.chat(conversations, params)


@pytest.fixture(scope="module")
def model():
    return Qwen3(tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _without_timing(trajectory):
    return dataclasses.replace(trajectory, metadata={k: v for k, v in trajectory.metadata.items() if k != "elapsed_s"})


# The release's sampling (top-p, presence penalty); greedy with the penalty too, else the random
# model repeats one whitespace token and every stored turn is empty.
@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0, presence_penalty=1.1, max_tokens=10),
                                      SamplingParams(temperature=0.7, top_p=0.95, presence_penalty=1.1, max_tokens=10)],
                         ids=["greedy", "sampled"])
def test_trajectories_do_not_depend_on_the_prefix_cache(model, tokenizer, sampling):
    env = SimWebEnv(SimWebConfig(seed=3, tasks_per_level=1))
    tasks = env.tasks()[:2]
    config = AgentConfig(max_llm_calls=3, max_no_action_turns=4, sampling=sampling)
    injection = StepwiseInjection(POOL, BM25Selector(k=2, k_min=1))
    runs = {}
    for mib in (64, 0):
        backend = Recording(LocalEngine(model, tokenizer, max_batch_size=4, prefix_cache_mib=mib))
        runs[mib] = backend, ReActAgent(backend, config, injection).run_batch(tasks, env, n=2, seed=11)
    (cached, with_cache), (plain, without_cache) = runs[64], runs[0]
    assert [_without_timing(t) for t in with_cache] == [_without_timing(t) for t in without_cache]
    assert all(t.num_assistant_turns == 3 and all(t.step_injections) for t in with_cache)
    assert all(m.content for t in with_cache for m in t.messages)

    counters = cached.engine.counters
    assert counters.reused_tokens > 0 and plain.engine.counters.reused_tokens == 0
    # Every rollout runs all 3 turns, so call k's conversation i continues in call k + 1's. Each later
    # prompt parts from the earlier one inside it, where the earlier request's block began.
    for earlier, later in zip(cached.calls, cached.calls[1:]):
        for before, after in zip(earlier, later, strict=True):
            n = min(len(before), len(after))
            common = int(np.argmin(np.append(before[:n] == after[:n], False)))
            assert 0 < common < len(before) - 1
