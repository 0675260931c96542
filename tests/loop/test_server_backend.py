"""``policy.backend='server'``: each acting stage serves its policy's Hugging Face directory with a
server process started from ``policy.server.command`` and stops it afterwards.

The fast tests use ``tests.fakes.policy_server --scripted`` (a JAX-free process that answers every
chat with a fixed reply) to check the configuration, the stage keys, and a server killed after the
first rollout batch is on disk. Slow ones serve the on-policy student round by round, and run the
loop with the real stand-in (``expint_jax.llm.serve``) serving the tiny network, the teacher's
signal coming back through ``top_logprobs``."""

import json
import os
import re
from pathlib import Path

import pytest

from expint_jax.cli import main as expint
from expint_jax.experience.bank import ExperiencePool, write_pool_files
from expint_jax.loop import driver
from expint_jax.loop.layout import StageDir, StageId
from expint_jax.loop.stages import Run, stage_key
from expint_jax.records import read_trajectories
from expint_jax.token_signal import read_signals, signal_path
from tests.fakes.policy_server import SCRIPTED_REPLY, TRIGGER
from tests.fakes.processes import group_alive
from tests.loop.conftest import TINY, loop_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPTED = ("{python} -m tests.fakes.policy_server --scripted --checkpoint {checkpoint} --host {host} "
            "--port {port} --model-name {model_name}")
STANDIN = ("{python} -m tests.fakes.policy_server --checkpoint {checkpoint} --host {host} --port {port} "
           "--model-name {model_name} --max-context 2048 --max-logprobs 8")
ACTING = ("rollouts", "base_eval", "eval")  # the stages a scripted (always wrong) policy acts in


@pytest.fixture
def server_env(monkeypatch, tmp_path_factory):
    """The server processes import this repository and share one XLA cache."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cache = tmp_path_factory.getbasetemp() / "server_xla_cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.delenv(TRIGGER, raising=False)
    return monkeypatch


def _pids(run_dir: Path) -> list[int]:
    return [int(m) for log in run_dir.rglob("server.log") for m in re.findall(r"\] pid (\d+)", log.read_text())]


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize("flags, message", [
    (["--config.policy.server.command=vllm serve {checkpoint} --port {prot}"],
     "config.policy.server.command='vllm serve {checkpoint} --port {prot}': unknown placeholder {prot}"),
    (["--config.policy.server.command=vllm serve {checkpoint}"], "needs {port}"),
    (["--config.policy.server.command=no-such-engine serve {checkpoint} --port {port}"],
     "config.policy.server.command: 'no-such-engine' is not an executable on PATH"),
    ([f"--config.policy.server.command={SCRIPTED}", "--config.policy.server.api_key_env=EXPINT_TEST_NO_SUCH_KEY"],
     "config.policy.server.api_key_env='EXPINT_TEST_NO_SUCH_KEY': the policy server's API key is read from "
     "$EXPINT_TEST_NO_SUCH_KEY, which is not set"),
])
def test_a_bad_server_block_stops_the_run_with_one_line(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.delenv("EXPINT_TEST_NO_SUCH_KEY", raising=False)
    code = expint(["run", f"--config={TINY}", f"--config.runs_dir={tmp_path}", "--config.policy.backend=server",
                   *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.startswith("expint run:") and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_from_rollout_may_take_its_signal_from_a_server(tmp_path):
    loop_config(tmp_path, policy__backend="server", policy__server__command=SCRIPTED,
                trainer__step__teacher="from_rollout", trainer__step__divergence__kind="topk")


def _key(tmp_path, stage="rollouts", **overrides) -> dict:
    return stage_key(Run(loop_config(tmp_path, **overrides), tmp_path, None, None, None, None), 0, stage)


def test_the_acting_stages_keys_hold_the_servers_command_but_not_its_address(tmp_path):
    served = _key(tmp_path, policy__backend="server", policy__server__command=SCRIPTED)
    assert served["policy"]["server"] == {"command": SCRIPTED}
    moved = _key(tmp_path, policy__backend="server", policy__server__command=SCRIPTED, policy__server__port=8123,
                 policy__server__host="0.0.0.0", policy__server__startup_timeout_s=5.0,
                 policy__server__max_concurrency=3, policy__server__env=("CUDA_VISIBLE_DEVICES=1",))
    assert moved == served
    other = _key(tmp_path, policy__backend="server", policy__server__command=SCRIPTED + " --dtype bfloat16")
    assert other["policy"]["server"] != served["policy"]["server"]
    for stage in ("base_eval", "data", "eval"):
        assert _key(tmp_path, stage, policy__backend="server", policy__server__command=SCRIPTED)["policy"] == \
            served["policy"]
    # Without a server the key is what it was before servers existed: no "server" entry at all.
    local = _key(tmp_path)
    assert "server" not in local["policy"] and local["policy"]["backend"] == "local"
    assert _key(tmp_path, policy__server__command=SCRIPTED) == local


# ---------------------------------------------------------------------- a server dying mid-stage


def test_a_server_killed_mid_stage_fails_it_cleanly_and_a_rerun_resumes(tmp_path, capsys, server_env):
    """The scripted server dies at the first request after rollout batch 0 is on disk: `expint run`
    fails with one line, batch 1 is not written, and the rerun reuses batch 0 and finishes the loop."""
    args = ["run", f"--config={TINY}", f"--config.runs_dir={tmp_path}", "--config.policy.backend=server",
            f"--config.policy.server.command={SCRIPTED}", "--config.extract.batch_tasks=2"]
    run_dir = tmp_path / "loop_tiny"
    partial = StageDir(run_dir, StageId(0, "rollouts")).partial
    server_env.setenv(TRIGGER, str(partial / "rollouts_0000.jsonl"))
    assert expint(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("expint run: policy server `"), err
    assert "exited with code -9" in err and f"last lines of {partial / 'server.log'}" in err
    assert sorted(p.name for p in partial.glob("rollouts_*")) == ["rollouts_0000.jsonl"]
    assert not StageDir(run_dir, StageId(0, "rollouts")).is_done()
    first_batch = (partial / "rollouts_0000.jsonl").read_bytes()
    assert list(run_dir.glob("base_policy_*/config.json"))  # π_0 (the tiny random model) exported to be served
    assert _pids(run_dir) and not any(group_alive(pid) for pid in _pids(run_dir))

    server_env.delenv(TRIGGER)
    assert expint(args) == 0
    rollouts = run_dir / "iter_000" / "rollouts"
    assert (rollouts / "rollouts_0000.jsonl").read_bytes() == first_batch  # reused, not redone
    assert (rollouts / "rollouts_0001.jsonl").exists()
    assert all(StageDir(run_dir, StageId(0, name)).is_done()
               for name in ("rollouts", "extract", "base_eval", "data", "train", "eval"))
    for name in ACTING:
        assert "ready at http://127.0.0.1:" in (run_dir / "iter_000" / name / "server.log").read_text()
    answers = {t.messages[-1].content for t in read_trajectories(rollouts / "rollouts_0001.jsonl")}
    assert answers == {SCRIPTED_REPLY}  # the served policy acted
    assert len(_pids(run_dir)) == 1 + len(ACTING) and not any(group_alive(pid) for pid in _pids(run_dir))
    assert (run_dir / "report.md").exists()


def _with_pool(run, text="Open the source: visit the page before answering."):
    """E_0 written by hand (a scripted or random policy gives no informative group to extract one from)."""
    keys = driver.plan(run, driver.schedule(run.config.iterations))
    extract = StageDir(run.run_dir, StageId(0, "extract"))
    write_pool_files(extract.begin(keys["iter_000/extract"]), ExperiencePool().add(text, granularity="principle"))
    extract.publish(keys["iter_000/extract"], {"pool_size": 1, "informative_groups": 1})


@pytest.mark.slow  # trains two rounds of the tiny network
def test_each_on_policy_round_serves_the_student_the_previous_round_exported(tmp_path, server_env):
    config = loop_config(tmp_path, policy__backend="server", policy__server__command=SCRIPTED,
                         distill__regime="on_policy", distill__tasks=2, distill__samples=2, trainer__epochs=2,
                         distill__heldout_tasks=1)
    run = driver.open_run(config)
    _with_pool(run)
    driver.run_loop(config, run=run, only=[StageId(0, "data"), StageId(0, "train")], echo=lambda line: None)
    train = run.stage_dir(0, "train")
    rounds = len(json.loads((train / "rounds.json").read_text())["steps_per_round"])
    assert rounds == 2
    served = []
    for r in range(rounds):
        log = (train / f"round_{r:03d}" / "server.log").read_text()
        served.append(re.search(r"--checkpoint (\S+)", log).group(1))
        assert "stopped (exit code" in log
        assert {t.messages[-1].content for t in read_trajectories(train / f"round_{r:03d}" / "student_0000.jsonl")} \
            == {SCRIPTED_REPLY}
    assert Path(served[0]).name.startswith("base_policy_")  # π_0, exported
    assert served[1] == str(StageDir(run.run_dir, StageId(0, "train")).partial / "round_000" / "student")
    assert not any(group_alive(pid) for pid in _pids(run.run_dir))


# ---------------------------------------------------------------------- the tiny network, served


@pytest.mark.slow
def test_the_loop_with_a_served_network_and_the_teachers_signal_from_its_top_logprobs(tmp_path, server_env):
    config = loop_config(tmp_path, policy__backend="server", policy__server__command=STANDIN,
                         trainer__step__teacher="from_rollout", trainer__step__divergence__kind="topk",
                         trainer__step__divergence__top_k=8, distill__accept_reward=0.0, distill__tasks=2,
                         distill__heldout_tasks=1, on_empty="keep_policy")
    run = driver.open_run(config)
    driver.run_loop(config, run=run, only=[StageId(0, "rollouts")], echo=lambda line: None)
    _with_pool(run)  # a random network never answers right: E_0 for the teacher to act with
    result = driver.run_loop(config, run=run, echo=lambda line: None)
    assert set(result.ran) == {"iter_000/base_eval", "iter_000/data", "iter_000/train", "iter_000/eval"}
    data = run.stage_dir(0, "data")
    for name in ("accepted.jsonl", "heldout.jsonl"):
        trajectories = read_trajectories(data / name)
        signals = read_signals(signal_path(data / name))
        assert trajectories and [s.task_id for s in signals] == [t.task_id for t in trajectories]
        for signal_, trajectory in zip(signals, trajectories):
            assert len(signal_.turns) == trajectory.num_assistant_turns
            # From the server: k = 8 alternatives at each generated token, none after the last.
            assert all(turn is not None and turn.k == 8 and turn.num_positions == len(turn.token_ids)
                       for turn in signal_.turns)
    summary = StageDir(run.run_dir, StageId(0, "train")).marker()["summary"]
    assert summary["status"] == "trained" or "skipped_no_signal" in summary["reason"]
    evaluation = StageDir(run.run_dir, StageId(0, "eval")).marker()["summary"]
    assert set(evaluation) >= {"none", "global", "stepwise"}
    for name in ("rollouts", "base_eval", "data", "eval"):
        assert "ready at" in (run.stage_dir(0, name) / "server.log").read_text()
    assert not any(group_alive(pid) for pid in _pids(run.run_dir))


@pytest.mark.parametrize("thinking, sent", [(False, False), (True, None)])
def test_thinking_off_reaches_the_served_policy_as_the_template_switch(tmp_path, monkeypatch, thinking, sent):
    from expint_jax.loop import acting

    asked = []

    class Server:  # records what the loop asks of the policy server
        def __init__(self, spec, checkpoint, log_path):
            self.checkpoint = checkpoint

        def start(self):
            return self

        def backend(self, count_tokens=None, *, enable_thinking=None):
            asked.append(enable_thinking)
            return object()

        def stop(self):
            pass

    monkeypatch.setattr(acting, "PolicyServer", Server)
    config = loop_config(tmp_path, policy__backend="server", policy__server__command=SCRIPTED,
                         model__enable_thinking=thinking)
    acting.Actors(config, None, None, tmp_path).backend(tmp_path / "policy", lambda: None, tmp_path / "logs")
    assert asked == [sent]  # thinking on (the default) sends nothing, as before
