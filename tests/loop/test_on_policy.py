"""On-policy data are samples of the student's *current* weights, refreshed every round, with the
teacher's step-wise contexts built on those very samples.

The tiny random Qwen3 acts (its samples are gibberish, which is all this needs: they are a
function of its weights); the pool E_0 is written by hand, since a random network gives no
informative group to extract one from.
"""

import json

import numpy as np
import pytest

from expint_jax.experience.bank import ExperiencePool, write_pool_files
from expint_jax.loop import acting, driver, stages
from expint_jax.loop.layout import StageDir, StageId
from expint_jax.models.source import load_model
from expint_jax.records import read_trajectories
from tests.loop.conftest import loop_config

LESSONS = ("Open the source: When search results only show snippets, visit the page before answering.",
           "Match names exactly: When a page's title only resembles the entity, keep looking.",
           "Cover every part: When a question combines several facts, open the page of each one.")


@pytest.fixture(scope="module")
def on_policy_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    config = loop_config(runs, distill__regime="on_policy", distill__tasks=2, distill__samples=2, trainer__epochs=2,
                         trainer__optimizer__learning_rate=3e-2, trainer__optimizer__warmup_steps=0,
                         distill__heldout_tasks=1, agent__max_tokens=12, agent__max_llm_calls=2)
    run = driver.open_run(config)
    keys = driver.plan(run, driver.schedule(1))
    pool = ExperiencePool()
    for text in LESSONS:
        pool = pool.add(text, granularity="principle", iteration=0)
    extract = StageDir(run.run_dir, StageId(0, "extract"))
    write_pool_files(extract.begin(keys["iter_000/extract"]), pool)
    extract.publish(keys["iter_000/extract"], {"pool_size": len(pool), "informative_groups": 1})
    for name in ("data", "train"):
        folder = StageDir(run.run_dir, StageId(0, name))
        summary = stages.STAGE_FUNCTIONS[name](run, 0, folder.begin(keys[f"iter_000/{name}"]))
        folder.publish(keys[f"iter_000/{name}"], summary)
    return config, run, pool


def _sample(run, model, seed, tasks):
    backend = acting.acting_backend(run.config, model, run.tokenizer, run.mesh)
    from expint_jax.rollout.agent import ReActAgent

    return ReActAgent(backend, acting.agent_config(run.config)).run_batch(tasks, run.worlds.train,
                                                                          n=run.config.distill.samples, seed=seed)


def test_each_round_samples_the_student_that_finished_the_previous_round(on_policy_run):
    config, run, _ = on_policy_run
    train_dir = run.stage_dir(0, "train")
    summary = json.loads((train_dir / "done.json").read_text())["summary"]
    assert summary["status"] == "trained" and summary["loss"] == "reverse_kl"
    plan = json.loads((train_dir / "rounds.json").read_text())["steps_per_round"]
    assert len(plan) == 2 and summary["steps"] == sum(plan)  # refresh every epoch: one round per epoch
    tasks = acting.pick(run.worlds.train.tasks(), config.distill.tasks)
    second = acting.read_rollouts(train_dir / "round_001", "student")
    seed = run.seed(0, "train") + 1
    after_round_0 = load_model(train_dir / "round_000" / "student", config.model)
    replay = _sample(run, after_round_0, seed, tasks)
    assert [t.messages for t in replay] == [t.messages for t in second]  # the weights that finished round 0
    initial = _sample(run, run.load_policy(0), seed, tasks)
    assert [t.messages for t in initial] != [t.messages for t in second]  # not the initial weights
    trained = load_model(train_dir / "policy", config.model)
    assert not np.array_equal(np.asarray(after_round_0.embed[...]), np.asarray(trained.embed[...]))  # round 1 trained


def test_the_teacher_contexts_are_built_on_the_students_own_prefixes(on_policy_run):
    _, run, pool = on_policy_run
    for r in range(2):
        folder = run.stage_dir(0, "train") / f"round_{r:03d}"
        samples = acting.read_rollouts(folder, "student")
        annotated = read_trajectories(folder / "annotated.jsonl")
        assert [t.messages for t in annotated] == [t.messages for t in samples]
        assert all(t.injection == "none" and not t.step_injections for t in samples)  # sampled without experience
        assert all(t.injection == "stepwise" and len(t.step_injections) == t.num_assistant_turns for t in annotated)
        assert all(set(ids) <= set(pool.ids) for t in annotated for ids in t.step_experience_ids)
