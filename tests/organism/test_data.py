"""Bootstrap trajectories: seeded contexts, each rollout records the experience it saw, disjoint worlds."""

import collections
import dataclasses

import pytest

from expint_jax.organism.data import CONTEXTS, ContextMix, CorpusConfig, bootstrap_trajectories, draw_contexts

SMALL = CorpusConfig(seeds=(101, 102), tasks_per_level=6, samples=2)


@pytest.fixture(scope="module")
def trajectories():
    return bootstrap_trajectories(SMALL)


def test_deterministic_and_complete(trajectories):
    assert len(trajectories) == 2 * 2 * 6 * 2  # seeds x levels x tasks x samples
    def timeless(t):  # the agent records its own wall time
        return {**t.to_json(), "metadata": {k: v for k, v in t.metadata.items() if k != "elapsed_s"}}

    assert [timeless(t) for t in bootstrap_trajectories(SMALL)] == [timeless(t) for t in trajectories]


def test_each_rollout_records_the_experience_of_its_context(trajectories):
    by_context = collections.defaultdict(list)
    for t in trajectories:
        by_context[t.metadata["bootstrap_context"]].append(t)
    assert set(by_context) <= set(CONTEXTS) and len(by_context) >= 3
    for context, runs in by_context.items():
        for t in runs:
            stepwise = any(block.strip() for block in t.step_injections)
            if context == "none":
                assert not t.global_injection and not stepwise
            elif context == "global":
                assert "Accumulated experiences" in t.global_injection and not stepwise
            else:
                assert stepwise and "Experiences relevant to this step" in "".join(t.step_injections)


def test_contexts_follow_the_mix():
    only_none = dataclasses.replace(SMALL, mix=ContextMix(none=1, global_=0, stepwise=0, stepwise_random=0,
                                                          stepwise_instance=0))
    assert {c for row in draw_contexts([f"t{i}" for i in range(50)], only_none, 0) for c in row} == {"none"}
    drawn = [c for row in draw_contexts([f"t{i}" for i in range(400)], SMALL, 0) for c in row]
    shares = {c: drawn.count(c) / len(drawn) for c in CONTEXTS}
    assert all(abs(shares[c] - w) < 0.06 for c, w in SMALL.mix.weights().items())
    with pytest.raises(ValueError, match="ContextMix weights"):
        ContextMix(none=-1)
