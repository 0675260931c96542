"""The loop's extraction under the release's schedule (``extract.schedule="release_steps"``, issue 12
item 6): E_k built over epochs of small steps inside the extract stage, laid out as the release lays
out its runs, resumable per step, its settings part of the stage key.

The scripted SimWeb policy acts and the offline writer writes, on a tiny plan: 2 epochs x 2 batches
of 2 queries x 2 rollouts = 4 steps over the 4 training tasks of ``loop_tiny.py``.
"""

import json
import re
from pathlib import Path

import pytest

from expint_jax.config import ConfigError, bind, load_config_file
from expint_jax.experience.bank import read_pool
from expint_jax.experience.release_format import parse_release_pool, parse_release_stats
from expint_jax.loop import acting, driver
from expint_jax.loop.config import LoopConfig
from expint_jax.loop.layout import StageDir, StageId, StaleStageError
from expint_jax.records import read_trajectories
from tests.loop.conftest import loop_config

PLAN = dict(extract__schedule="release_steps", extract__samples=2, extract__steps__epochs=2,
            extract__steps__batches_per_epoch=2, extract__steps__queries_per_batch=2)
OVERRIDES = dict(policy__backend="reference", extract__warm_start=True, distill__heldout_tasks=0, **PLAN)
STEPS = 4
ONLY = [StageId(0, "rollouts"), StageId(0, "extract")]
OFFICIAL_STATS = Path("/work/shared/data/official_stats_example.json")


def _quiet(line):
    pass


@pytest.fixture(scope="module")
def release_run(tmp_path_factory):
    """One whole iteration under the release schedule."""
    runs = tmp_path_factory.mktemp("runs")
    config = loop_config(runs, **OVERRIDES)
    result = driver.run_loop(config, echo=_quiet)
    return config, runs / "loop_tiny", result


def _finished_at(run_dir: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(run_dir)): json.loads(p.read_text())["finished_at"]
            for p in sorted(run_dir.glob("iter_*/*/done.json"))}


def _entry_keys(text: str) -> set[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The keys of each step's entry of a stats file and of its rollout block (Pass@<n> read as Pass@n)."""
    return {(tuple(sorted(entry)), tuple(sorted(re.sub(r"Pass@\d+", "Pass@n", k) for k in entry["rollout"])))
            for entry in json.loads(text).values()}


def test_the_extract_stage_writes_the_release_layout_and_the_pool_files(release_run):
    config, run_dir, result = release_run
    assert "iter_000/extract" in result.ran and result.stopped is None
    extract = run_dir / "iter_000" / "extract"
    train_ids = {t.task_id: t for t in acting.pick(acting.Worlds.of(config).train.tasks(), 0)}
    for epoch in range(2):
        sampled = [json.loads(line) for line in (extract / f"epoch_{epoch}" / "shuffled_data.jsonl").open()]
        assert len(sampled) == 4 and {row["id"] for row in sampled} <= set(train_ids)
        assert all(set(row) == {"id", "problem", "groundtruth"} for row in sampled)
    pools = [{}] + [parse_release_pool((extract / f"step_{k}" / "experiences.json").read_text())
                    for k in range(1, STEPS + 1)]
    for step in range(STEPS):
        rollouts = read_trajectories(extract / f"step_{step}" / "rollouts.jsonl")
        assert len(rollouts) == 2 * 2  # queries x rollouts
        # Each step saw the pool entering it in the prompt; the stored question is the plain one.
        assert all(t.metadata["experience_in_prompt"] == len(pools[step]) for t in rollouts)
        assert all(t.messages[1].content == train_ids[t.task_id].question for t in rollouts)
    assert any(pools[1:STEPS])  # a later step did see a pool
    final = read_pool(extract / "pool.jsonl")
    assert final == read_pool(extract / f"step_{STEPS}" / "pool.jsonl") and len(final) > 0
    assert final.as_mapping() == pools[STEPS] == json.loads((extract / "pool.json").read_text())
    assert (extract / "granularity.json").exists() and (extract / "diff.json").exists()
    summary = StageDir(run_dir, StageId(0, "extract")).marker()["summary"]
    assert (summary["schedule"], summary["steps"], summary["rollouts"], summary["pool_size"]) == (
        "release_steps", STEPS, STEPS * 4, len(final))
    # The rollouts stage records nothing: the extract stage owns the schedule's rollouts.
    rollouts_stage = run_dir / "iter_000" / "rollouts"
    assert not list(rollouts_stage.glob("rollouts_*.jsonl"))
    assert StageDir(run_dir, StageId(0, "rollouts")).marker()["summary"]["rollouts"] == 0


def test_stats_json_is_the_release_format(release_run):
    _, run_dir, _ = release_run
    text = (run_dir / "iter_000" / "extract" / "stats.json").read_text()
    stats = parse_release_stats(text)
    assert [(key, s.epoch, s.batch, s.complete, s.k) for key, s in stats.items()] == [
        ("step_0", 0, 0, True, 2), ("step_1", 0, 1, True, 2), ("step_2", 1, 0, True, 2), ("step_3", 1, 1, True, 2)]
    official = OFFICIAL_STATS.read_text()
    parse_release_stats(official)
    # Same entries, same keys, same layout (two-space indent, no trailing newline) as the release's file.
    assert _entry_keys(text) == _entry_keys(official) == {(("batch", "complete", "epoch", "rollout"),
                                                            ("Pass@n", "avg_reward", "avg_tool_call"))}
    assert text == json.dumps(json.loads(text), indent=2) and official.rstrip("\n") == json.dumps(
        json.loads(official), indent=2)
    step = read_trajectories(run_dir / "iter_000" / "extract" / "step_0" / "rollouts.jsonl")
    assert stats["step_0"].avg_reward == pytest.approx(sum(t.reward for t in step) / len(step))
    assert stats["step_0"].avg_tool_call == pytest.approx(sum(t.num_tool_calls for t in step) / len(step))


def test_the_later_stages_work_on_the_steps_pool(release_run):
    _, run_dir, result = release_run
    assert [s for s in result.ran if s != "iter_000/rollouts"] == [
        "iter_000/extract", "iter_000/base_eval", "iter_000/data", "iter_000/train", "iter_000/eval"]
    pool = read_pool(run_dir / "iter_000" / "extract" / "pool.jsonl")
    teacher = acting.read_rollouts(run_dir / "iter_000" / "data", "teacher")
    assert teacher and all(set(ids) <= set(pool.ids) for t in teacher for ids in t.step_experience_ids)
    assert any(ids for t in teacher for ids in t.step_experience_ids)
    assert StageDir(run_dir, StageId(0, "train")).marker()["summary"]["status"] in ("trained", "kept_policy")
    evaluated = json.loads((run_dir / "iter_000" / "eval" / "eval.json").read_text())
    assert evaluated["pool_size"] == len(pool) and evaluated["stepwise"]["rollouts"] == 2 * 2


def test_a_rerun_redoes_nothing_and_changed_schedule_settings_are_refused(release_run):
    config, run_dir, _ = release_run
    before = _finished_at(run_dir)
    again = driver.run_loop(config, echo=_quiet)
    assert again.ran == () and _finished_at(run_dir) == before
    changes = [({"extract__steps__epochs": 1}, "iter_000/extract", "extract.steps.epochs"),
               ({"extract__steps__queries_per_batch": 1}, "iter_000/extract", "extract.steps.queries_per_batch"),
               # the extract stage acts under this schedule: the agent's settings are in its key
               ({"agent__temperature": 0.3}, "iter_000/extract", "agent.temperature"),
               ({"extract__schedule": "single"}, "iter_000/rollouts", "extract")]
    for change, stage, key in changes:
        changed = loop_config(run_dir.parent, **{**OVERRIDES, **change})
        with pytest.raises(StaleStageError, match=rf"{stage} \(finished.*differing keys.*{re.escape(key)}"):
            driver.run_loop(changed, echo=_quiet)
    assert _finished_at(run_dir) == before  # refused before any work


class Interrupted(Exception):
    pass


class CountingBackend:
    """The acting backend, counting the rollout batches it starts (a batch's first request has only
    the system prompt and the question) and raising when batch ``fail_at`` starts."""

    def __init__(self, backend, fail_at=None):
        self.backend, self.fail_at, self.batches = backend, fail_at, 0

    def __getattr__(self, name):  # e.g. a backend's own count_tokens
        return getattr(self.backend, name)

    def chat(self, conversations, params):
        if conversations and all(len(c) == 2 for c in conversations):
            if self.batches == self.fail_at:
                raise Interrupted(f"killed at the start of batch {self.batches}")
            self.batches += 1
        return self.backend.chat(conversations, params)


def test_a_killed_extract_stage_resumes_at_its_first_unfinished_step(release_run, tmp_path, monkeypatch):
    _, reference_dir, _ = release_run
    config = loop_config(tmp_path, **OVERRIDES)
    real = acting.acting_backend
    made = []

    def backend(fail_at):
        def make(*args, **kwargs):
            made.append(CountingBackend(real(*args, **kwargs), fail_at))
            return made[-1]
        return make

    monkeypatch.setattr(acting, "acting_backend", backend(fail_at=2))
    with pytest.raises(Interrupted):
        driver.run_loop(config, only=ONLY, echo=_quiet)
    partial = tmp_path / "loop_tiny" / "iter_000" / "extract.partial"
    assert list(parse_release_stats((partial / "stats.json").read_text())) == ["step_0", "step_1"]
    kept = {k: (partial / f"step_{k}" / "rollouts.jsonl").read_bytes() for k in (0, 1)}
    mtimes = {k: (partial / f"step_{k}" / "rollouts.jsonl").stat().st_mtime_ns for k in (0, 1)}

    monkeypatch.setattr(acting, "acting_backend", backend(fail_at=None))
    result = driver.run_loop(config, only=ONLY, echo=_quiet)
    assert result.ran == ("iter_000/extract",) and made[-1].batches == 2  # steps 2 and 3 only
    extract = tmp_path / "loop_tiny" / "iter_000" / "extract"
    assert all((extract / f"step_{k}" / "rollouts.jsonl").read_bytes() == kept[k] for k in (0, 1))
    assert all((extract / f"step_{k}" / "rollouts.jsonl").stat().st_mtime_ns == mtimes[k] for k in (0, 1))
    reference = reference_dir / "iter_000" / "extract"
    assert read_pool(extract / "pool.jsonl") == read_pool(reference / "pool.jsonl")  # as if never killed
    assert (extract / "stats.json").read_text() == (reference / "stats.json").read_text()


def test_warm_start_injects_the_previous_pool_into_the_first_step(release_run):
    config, run_dir, _ = release_run
    two = loop_config(run_dir.parent, iterations=2, **OVERRIDES)
    driver.run_loop(two, only=[StageId(1, "rollouts"), StageId(1, "extract")], echo=_quiet)
    previous = read_pool(run_dir / "iter_000" / "extract" / "pool.jsonl")
    first = read_trajectories(run_dir / "iter_001" / "extract" / "step_0" / "rollouts.jsonl")
    assert len(previous) and all(t.metadata["experience_in_prompt"] == len(previous) for t in first)


def test_the_schedule_is_checked_before_any_work(tmp_path):
    too_many = loop_config(tmp_path, **{**OVERRIDES, "extract__steps__batches_per_epoch": 3})
    with pytest.raises(ConfigError, match=r"config.extract.steps: batches_per_epoch=3 x queries_per_batch=2 need 6 "
                                          r"extraction tasks per epoch; the training world gives 4"):
        driver.run_loop(too_many, echo=_quiet)
    assert not (tmp_path / "loop_tiny").exists()
    with pytest.raises(ConfigError, match="config.extract.inject_running_pool"):
        loop_config(tmp_path, **{**OVERRIDES, "extract__inject_running_pool": True})
    with pytest.raises(ValueError, match="extract.steps"):
        loop_config(tmp_path, **{**OVERRIDES, "extract__steps__epochs": 0})


def test_the_paper_setting_uses_the_release_schedule_and_the_simweb_configs_the_single_one():
    configs = Path(__file__).resolve().parents[2] / "configs"
    paper = bind(LoopConfig, load_config_file(configs / "paper" / "base.py")).extract
    assert (paper.schedule, paper.steps.epochs, paper.steps.batches_per_epoch, paper.steps.queries_per_batch,
            paper.samples) == ("release_steps", 3, 25, 4, 5)
    for name in ("recipe.py", "loop_tiny.py"):
        assert bind(LoopConfig, load_config_file(configs / name)).extract.schedule == "single"
