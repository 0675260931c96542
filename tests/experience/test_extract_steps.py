"""The multi-step extraction driver (issue 12, item 6): the release's step_k/ layout, stats, resuming."""

import dataclasses
import json

import pytest

from expint_jax.experience.bank import ExperiencePool, read_pool
from expint_jax.experience.extract import ExtractionConfig
from expint_jax.experience.extract.steps import (StepPlan, pipeline_writer, problem_with_experience,
                                                 read_step_rollouts, run_extraction_steps)
from expint_jax.experience.release_format import parse_release_pool, parse_release_stats
from expint_jax.records import Completion, Message, SamplingParams, Trajectory
from tests.experience.fake_extractor import TITLES, good_responders

CONFIG = ExtractionConfig(max_retries=0, sampling=SamplingParams(temperature=0.0, max_tokens=256))
PLAN = StepPlan(epochs=2, batch_size=2, rollouts_per_query=3, queries_per_epoch=4, seed=1)


def writer():
    return pipeline_writer(FakeExtractor(), CONFIG)


@dataclasses.dataclass(frozen=True)
class Query:
    task_id: str
    question: str
    answer: str


TASKS = [Query(f"q{i}", f"Which year did the {name} open?", str(1900 + i))
         for i, name in enumerate(["bridge", "tower", "museum", "harbor", "library", "theatre"])]


class FakeExtractor:
    """The deterministic extraction LLM of ``fake_extractor``, as an in-process ``ChatBackend``."""

    def __init__(self):
        self.responders = good_responders()

    def chat(self, conversations, params):
        out = []
        for conversation in conversations:
            messages = [m.to_json() for m in conversation]
            stage = next(s for s, title in TITLES.items() if messages[1]["content"].startswith(title))
            out.append(Completion(self.responders[stage](messages)))
        return out


class FakeRollout:
    """Three judged rollouts per task (one right), recording the pool each step was given."""

    def __init__(self):
        self.calls = []  # (step, task ids, pool mapping)

    def __call__(self, tasks, pool, step):
        self.calls.append((step, [t.task_id for t in tasks], pool.as_mapping()))
        return [Trajectory(task_id=t.task_id, reward=float(r == 0), ground_truth=t.answer, num_tool_calls=r,
                           messages=(Message("system", "s"), Message("user", t.question),
                                     Message("assistant", f"<answer>{t.answer if r == 0 else 'no'}</answer>")))
                for t in tasks for r in range(3)]


def test_problem_with_experience_follows_the_release_template():
    assert problem_with_experience("What is 2+2?", {}) == "What is 2+2?"
    prompt = problem_with_experience("What is 2+2?", {"G0": "Check: verify sums."})
    assert "accumulated experiences" in prompt and "[G0]. Check: verify sums." in prompt
    assert prompt.endswith("**CURRENT PROBLEM:**\nWhat is 2+2?")


def test_steps_write_the_release_layout_and_feed_each_pool_to_the_next_step(tmp_path):
    rollout = FakeRollout()
    final = run_extraction_steps(TASKS, rollout, writer(), PLAN, tmp_path)
    assert [step for step, _, _ in rollout.calls] == [0, 1, 2, 3]
    assert rollout.calls[0][2] == {}
    for step, _, pool in rollout.calls[1:]:
        assert pool == parse_release_pool((tmp_path / f"step_{step}" / "experiences.json").read_text())
    assert parse_release_pool((tmp_path / "step_4" / "experiences.json").read_text()) == final.as_mapping()
    assert read_pool(tmp_path / "step_4" / "pool.jsonl") == final  # ours, with provenance
    assert [[t.task_id for t in step] for step in read_step_rollouts(tmp_path, PLAN.steps(len(TASKS)))] == [
        [i for i in ids for _ in range(3)] for _, ids, _ in rollout.calls]
    assert len(final) > 0
    stats = parse_release_stats((tmp_path / "stats.json").read_text())
    assert list(stats) == ["step_0", "step_1", "step_2", "step_3"]
    assert [(s.epoch, s.batch, s.complete, s.k) for s in stats.values()] == [(0, 0, True, 3), (0, 1, True, 3),
                                                                            (1, 0, True, 3), (1, 1, True, 3)]
    first = stats["step_0"]
    assert (first.avg_reward, first.pass_at_k, first.avg_tool_call) == (pytest.approx(1 / 3), 1.0, 1.0)
    raw = json.loads((tmp_path / "stats.json").read_text())
    assert set(raw["step_0"]["rollout"]) == {"avg_reward", "Pass@3", "avg_tool_call"}
    epoch_0 = [json.loads(line)["id"] for line in (tmp_path / "epoch_0" / "shuffled_data.jsonl").read_text().splitlines()]
    assert len(epoch_0) == 4 and [i for _, ids, _ in rollout.calls[:2] for i in ids] == epoch_0


class Crash(Exception):
    pass


def test_a_killed_run_resumes_at_the_step_it_stopped(tmp_path):
    reference = run_extraction_steps(TASKS, FakeRollout(), writer(), PLAN, tmp_path / "whole")

    def crash_after_step_1(step, stats):
        if step == 1:
            raise Crash

    with pytest.raises(Crash):
        run_extraction_steps(TASKS, FakeRollout(), writer(), PLAN, tmp_path / "run",
                             on_step_done=crash_after_step_1)
    again = FakeRollout()
    resumed = run_extraction_steps(TASKS, again, writer(), PLAN, tmp_path / "run")
    assert [step for step, _, _ in again.calls] == [2, 3]  # steps 0 and 1 are not rolled out again
    assert resumed.as_mapping() == reference.as_mapping()
    assert read_pool(tmp_path / "run" / "step_3" / "extraction" / "pool.jsonl") == resumed


def test_the_plan_and_the_rollouts_are_checked(tmp_path):
    with pytest.raises(ValueError, match="multiple of batch_size"):
        StepPlan(batch_size=4, queries_per_epoch=10)

    def too_few(tasks, pool, step):
        return FakeRollout()(tasks, pool, step)[:-1]

    with pytest.raises(ValueError, match="expected 3 rollouts per task"):
        run_extraction_steps(TASKS, too_few, writer(), PLAN, tmp_path, start_pool=ExperiencePool())
