"""Loop mistakes: bad configurations stop at start-up with one line; a failing endpoint fails its
stage naming the endpoint and leaves the finished stages as they were."""

import json

import pytest

from expint_jax.cli import run as run_command
from expint_jax.loop import driver
from expint_jax.loop.layout import StageDir, StageId
from expint_jax.loop.stages import EndpointError
from tests.loop.conftest import TINY, loop_config


@pytest.mark.parametrize("flag, message", [
    ("--config.bogus=1", "bogus"),
    ("--config.distill.regime=offpolicy", "config.distill.regime: 'offpolicy' is not one of"),
    ("--config.extract.granularity=lesson", "config.extract.granularity: 'lesson' is not one of"),
    ("--config.injection.mode=sometimes", "config.injection.mode: 'sometimes' is not one of"),
    ("--config.extract.writer=gpt", "config.extract.writer: 'gpt' is not one of"),
    ("--config.injection.selector=random", "config.injection.selector: 'random' is not one of"),
    ("--config.iterations=two", "iterations"),
    ("--config.model.checkpoint=/no/such/dir", "config.model.checkpoint='/no/such/dir': no Hugging Face checkpoint"),
    ("--config.extract.writer=llm", "config.extract.endpoint.base_url=''"),
    ("--config.eval.modes=('none','sideways')", "eval.modes"),
    ("--config.trainer.step.teacher=from_rollout", "config.trainer.step"),
    ("--config.trainer.step.teacher=from_rollout --config.trainer.step.divergence.kind=topk "
     "--config.distill.regime=sft", "only off_policy trains on (distill.regime='sft')"),
    ("--config.trainer.step.teacher=from_rollout --config.trainer.step.divergence.kind=topk "
     "--config.policy.backend=reference", "the reference policy records no log-probabilities"),
])
def test_bad_configurations_stop_before_any_work_with_one_line(tmp_path, capsys, flag, message):
    code = run_command.main([f"--config={TINY}", f"--config.runs_dir={tmp_path}", *flag.split()])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.startswith("expint run:") and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_a_writer_endpoint_without_its_key_variable_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EXPINT_TEST_NO_SUCH_KEY", raising=False)
    code = run_command.main([f"--config={TINY}", f"--config.runs_dir={tmp_path}", "--config.extract.writer=llm",
                             "--config.extract.endpoint.base_url=http://127.0.0.1:9/v1",
                             "--config.extract.endpoint.model=m",
                             "--config.extract.endpoint.api_key_env=EXPINT_TEST_NO_SUCH_KEY"])
    err = capsys.readouterr().err
    assert code == 2 and "$EXPINT_TEST_NO_SUCH_KEY, which is not set" in err and not any(tmp_path.iterdir())


def test_an_unreachable_endpoint_fails_the_stage_naming_it_and_keeps_finished_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPINT_TEST_KEY", "sk-secret-value")
    config = loop_config(tmp_path, policy__backend="reference", extract__writer="llm",
                         extract__endpoint__base_url="http://127.0.0.1:9/v1", extract__endpoint__model="writer-model",
                         extract__endpoint__api_key_env="EXPINT_TEST_KEY", extract__endpoint__max_attempts=1,
                         extract__endpoint__timeout_s=5.0, simweb__train_tasks_per_level=6, extract__samples=4)
    with pytest.raises(EndpointError) as caught:
        driver.run_loop(config, echo=lambda line: None)
    message = str(caught.value)
    assert "endpoint http://127.0.0.1:9/v1 (model writer-model)" in message and "sk-secret-value" not in message
    run_dir = tmp_path / "loop_tiny"
    rollouts = StageDir(run_dir, StageId(0, "rollouts"))
    assert rollouts.is_done() and not StageDir(run_dir, StageId(0, "extract")).is_done()
    finished = json.loads((rollouts.final / "done.json").read_text())["finished_at"]
    with pytest.raises(EndpointError):  # the rerun resumes at the failed stage, the finished one untouched
        driver.run_loop(config, echo=lambda line: None)
    assert json.loads((rollouts.final / "done.json").read_text())["finished_at"] == finished
