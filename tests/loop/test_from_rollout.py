"""``trainer.step.teacher="from_rollout"`` in the loop: the teacher's rollouts keep its top-k + tail
at every token beside the trajectories (in step with what is accepted), and training reads them
with no teacher model. The tiny random Qwen3 acts and every rollout is accepted
(``accept_reward=0``), since a random network is never right; E_0 is written by hand."""

import pytest

from expint_jax.experience.bank import ExperiencePool, write_pool_files
from expint_jax.loop import driver, stages
from expint_jax.loop.layout import StageDir, StageId
from expint_jax.records import read_trajectories
from expint_jax.token_signal import read_signals, signal_path
from tests.loop.conftest import loop_config


@pytest.fixture(scope="module")
def signal_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    config = loop_config(runs, trainer__step__teacher="from_rollout", trainer__step__divergence__kind="topk",
                         trainer__step__divergence__top_k=8, distill__accept_reward=0.0, distill__tasks=2,
                         distill__samples=2, distill__heldout_tasks=1, agent__max_tokens=12, agent__max_llm_calls=2)
    run = driver.open_run(config)
    keys = driver.plan(run, driver.schedule(1))
    pool = ExperiencePool().add("Open the source: When results show snippets, visit the page.", granularity="principle")
    extract = StageDir(run.run_dir, StageId(0, "extract"))
    write_pool_files(extract.begin(keys["iter_000/extract"]), pool)
    extract.publish(keys["iter_000/extract"], {"pool_size": 1, "informative_groups": 1})
    loaded = []
    real_load = run.load_policy
    run.load_policy = lambda k, **kw: loaded.append((k, kw)) or real_load(k, **kw)
    summaries = {}
    for name in ("data", "train"):
        folder = StageDir(run.run_dir, StageId(0, name))
        summaries[name] = stages.STAGE_FUNCTIONS[name](run, 0, folder.begin(keys[f"iter_000/{name}"]))
        folder.publish(keys[f"iter_000/{name}"], summaries[name])
    return run, summaries, loaded


def test_the_teachers_signal_is_kept_beside_the_accepted_and_heldout_rollouts(signal_run):
    run, summaries, _ = signal_run
    data_dir = run.stage_dir(0, "data")
    for name in ("accepted.jsonl", "heldout.jsonl"):
        trajectories = read_trajectories(data_dir / name)
        signals = read_signals(signal_path(data_dir / name))
        assert trajectories and [s.task_id for s in signals] == [t.task_id for t in trajectories]
        assert all(len(s.turns) == t.num_assistant_turns and all(turn is not None and turn.k == 8 for turn in s.turns)
                   for s, t in zip(signals, trajectories))
    assert summaries["data"]["accepted"] == 2 * 2


def test_training_reads_the_signal_and_never_loads_a_teacher(signal_run):
    _, summaries, loaded = signal_run
    train = summaries["train"]
    remats = [kw.get("remat") for _, kw in loaded]  # the data stage's acting teacher comes first
    if train["status"] == "trained":
        assert remats == [None, "none"]  # the student, and no second model for a teacher
        assert train["loss"] == "topk" and train["kl_before"] is None and train["heldout_loss_before"] is not None
    else:
        # A random network's turns rarely re-tokenize as sampled (a stripped space, split UTF-8):
        # every example failed the signal alignment, and the loop says so instead of training on nothing.
        assert train["status"] == "kept_policy" and "'skipped_no_signal': 4" in train["reason"]
        assert remats == [None, None]  # π_0 re-exported as π_1; no student, no teacher built
