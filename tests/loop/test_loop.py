"""The loop end to end on CPU: every stage, resume, stale configurations, restarts, regimes' data.

Two backends act: the tiny random Qwen3 (``loop_tiny.py`` as is: the network cannot solve a task,
so the loop must say there is nothing to distill and keep the policy), and SimWeb's scripted
``ReferencePolicy`` (``policy.backend="reference"``), so that extraction, acceptance, training
and evaluation all see real data.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from expint_jax import storage
from expint_jax.loop import acting, driver, stages
from expint_jax.loop.layout import StageDir, StageId, StaleStageError
from expint_jax.records import read_trajectories
from tests.loop.conftest import loop_config

ALL_STAGES = ["iter_000/rollouts", "iter_000/extract", "iter_000/base_eval", "iter_000/data", "iter_000/train",
              "iter_000/eval"]


def _finished_at(run_dir: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(run_dir)): json.loads(p.read_text())["finished_at"]
            for p in sorted(run_dir.glob("iter_*/*/done.json"))}


def _policy_params(run_dir: Path, k: int = 0) -> dict[str, np.ndarray]:
    return load_file(run_dir / f"iter_{k:03d}" / "train" / "policy" / "model.safetensors")


def test_loop_tiny_runs_every_stage_and_says_when_there_is_nothing_to_distill(tmp_path):
    echoed = []
    result = driver.run_loop(loop_config(tmp_path), echo=echoed.append)
    run_dir = tmp_path / "loop_tiny"
    assert list(result.ran) == ALL_STAGES and result.stopped is None
    train = StageDir(run_dir, StageId(0, "train")).marker()["summary"]
    # A random network answers nothing right: no informative group, an empty pool, π_1 = π_0.
    assert train["status"] == "kept_policy" and "pool is empty" in train["reason"]
    assert any("nothing to work with" in line for line in echoed)
    assert (run_dir / "iter_000" / "train" / "policy" / "config.json").exists()
    report = (run_dir / "report.md").read_text()
    assert "| π_0 | none |" in report and "| π_1 | none |" in report and "kept_policy" in report
    assert "What this testbed builds in" not in report  # a random network: nothing designed to state
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == [
        "acceptance.png", "accuracy.png", "assistant_turns.png", "pool.png", "premature_answers.png"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    evaluated = storage.read_json(run_dir / "iter_000" / "eval" / "eval.json")
    assert evaluated["none"]["rollouts"] == 2 * 2 and evaluated["global"] == {"skipped": "the pool is empty"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One iteration with the scripted policy acting: real pools, accepted trajectories, training."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = dict(policy__backend="reference", simweb__train_tasks_per_level=6, extract__samples=4,
                     extract__batch_tasks=3, distill__samples=3, simweb__levels=("easy", "medium"))
    config = loop_config(runs, **overrides)
    result = driver.run_loop(config, echo=lambda line: None)
    return config, overrides, runs, result


def test_every_stage_of_the_reference_loop_sees_real_data(reference_run):
    config, _, runs, result = reference_run
    run_dir = runs / "loop_tiny"
    assert list(result.ran) == ALL_STAGES
    extract = StageDir(run_dir, StageId(0, "extract")).marker()["summary"]
    assert extract["informative_groups"] > 0 and extract["pool_size"] > 0
    data = StageDir(run_dir, StageId(0, "data")).marker()["summary"]
    assert data["accepted"] > 0 and 0 < data["acceptance_rate"] < 1
    train = StageDir(run_dir, StageId(0, "train")).marker()["summary"]
    assert train["status"] == "trained" and train["steps"] >= 1 and train["loss"] == "forward_kl"
    assert train["kl_before"] is not None and train["kl_after"] is not None
    evaluated = storage.read_json(run_dir / "iter_000" / "eval" / "eval.json")
    assert all(evaluated[mode]["rollouts"] == 2 * 2 * 2 for mode in ("none", "global", "stepwise"))
    assert evaluated["heldout_kl"] == {"before": train["kl_before"], "after": train["kl_after"]}
    report = (run_dir / "report.md").read_text()
    assert "| π_1 | stepwise |" in report and f"{data['acceptance_rate']:.3f}" in report
    assert "## What this testbed builds in" in report and "Open the source" in report  # the designed effects


def test_off_policy_data_are_judged_correct_teacher_samples_with_experience(reference_run):
    config, _, runs, _ = reference_run
    data_dir = runs / "loop_tiny" / "iter_000" / "data"
    teacher = acting.read_rollouts(data_dir, "teacher")
    accepted = read_trajectories(data_dir / "accepted.jsonl")
    pool = stages.read_pool(runs / "loop_tiny" / "iter_000" / "extract" / "pool.jsonl")
    assert len(teacher) == 6 * 2 * 3 and accepted  # tasks x samples
    assert all(t.injection == "stepwise" and len(t.step_injections) == t.num_assistant_turns for t in teacher)
    assert all(set(ids) <= set(pool.ids) for t in teacher for ids in t.step_experience_ids)
    assert [t.to_json() for t in accepted] == [t.to_json() for t in teacher if t.reward >= config.distill.accept_reward]
    rates = storage.read_json(data_dir / "acceptance.json")
    assert rates["accepted"] == len(accepted) and rates["rate"] == pytest.approx(len(accepted) / len(teacher))


def test_a_rerun_redoes_nothing_and_a_changed_setting_is_refused_naming_stage_and_key(reference_run):
    config, overrides, runs, _ = reference_run
    run_dir = runs / "loop_tiny"
    before = _finished_at(run_dir)
    again = driver.run_loop(config, echo=lambda line: None)
    assert again.ran == () and list(again.skipped) == ALL_STAGES and _finished_at(run_dir) == before
    changed = loop_config(runs, **{**overrides, "distill__samples": 2})
    with pytest.raises(StaleStageError, match=r"iter_000/data \(finished.*differing keys distill.samples"):
        driver.run_loop(changed, echo=lambda line: None)
    assert _finished_at(run_dir) == before  # refused before any work


def test_restart_from_a_stage_redoes_it_and_what_follows_with_the_same_result(reference_run):
    config, _, runs, _ = reference_run
    run_dir = runs / "loop_tiny"
    before, params = _finished_at(run_dir), _policy_params(run_dir)
    echoed = []
    result = driver.run_loop(config, restart_from="train", echo=echoed.append)
    assert list(result.ran) == ["iter_000/train", "iter_000/eval"]
    after = _finished_at(run_dir)
    assert all(after[s] == before[s] for s in ALL_STAGES[:4]) and all(after[s] > before[s] for s in ALL_STAGES[4:])
    redone = _policy_params(run_dir)
    assert redone.keys() == params.keys() and all(np.array_equal(redone[n], params[n]) for n in params)
    assert any(line.startswith("restart from iter_000/train: removed") for line in echoed)


@pytest.mark.slow  # a second reference run (~1 min on a shared 2-core CPU); the regime rule is tested fast
def test_sft_trains_with_nll_on_accepted_teacher_trajectories(tmp_path):
    config = loop_config(tmp_path, policy__backend="reference", simweb__train_tasks_per_level=6, extract__samples=4,
                         distill__samples=3, distill__regime="sft", eval__modes=("none",), distill__heldout_tasks=0)
    driver.run_loop(config, echo=lambda line: None)
    train = StageDir(tmp_path / "loop_tiny", StageId(0, "train")).marker()["summary"]
    assert train["status"] == "trained" and train["loss"] == "nll" and train["kl_before"] is None
    rows = [json.loads(line) for line in
            (tmp_path / "loop_tiny" / "iter_000" / "train" / "trainer" / "metrics" / "train.jsonl").open()]
    assert rows and all(r["loss"] > 0 for r in rows)


def test_run_axes_tabulates_a_finished_cell(reference_run):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "launch" / "run_axes.py"
    spec = importlib.util.spec_from_file_location("run_axes", path)
    run_axes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_axes)
    _, _, runs, _ = reference_run
    text = run_axes.table({"recipe": runs / "loop_tiny"})
    assert "| recipe | π_0 | none |" in text and "| recipe | π_1 | stepwise |" in text


def test_the_stage_commands_work_over_a_run_directory(reference_run, tmp_path, capsys):
    from expint_jax.cli import stages as stage_commands

    _, _, runs, _ = reference_run
    run_dir = str(runs / "loop_tiny")
    assert stage_commands.eval_main([run_dir]) == 0
    assert "iter_000/eval: done earlier" in capsys.readouterr().out
    assert stage_commands.report_main([run_dir]) == 0 and (runs / "loop_tiny" / "report.md").exists()
    assert stage_commands.export_main([run_dir, "--iteration", "0", "--out", str(tmp_path / "hf"),
                                       "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "bfloat16"
    assert stage_commands.eval_main([run_dir, "--iteration", "7"]) == 2
    assert "--iteration 7: the run has iterations 0..0" in capsys.readouterr().err
