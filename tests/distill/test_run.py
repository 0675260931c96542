"""``expint distill`` end to end on the offline demo data: outputs, export, resume, stale outputs, config errors."""

import json

import numpy as np
import pytest
from flax import nnx

from expint_jax import cli, storage
from expint_jax.config import bind, parse_command_line, to_dict
from expint_jax.distill import run as distill_run
from expint_jax.models.hf import load_checkpoint
from tests.distill.conftest import make_trajectory


def _args(tmp_path, *extra):
    return [f"--config.output_dir={tmp_path}", "--config.data.demo.train_tasks_per_level=2",
            "--config.data.demo.eval_tasks_per_level=1", "--config.data.demo.levels=('easy',)",
            "--config.data.demo.rollouts_per_task=2", "--config.trainer.epochs=1", "--config.trainer.batching.rows=2",
            "--config.trainer.progress_bar=False", "--config.trainer.checkpoint_every=2", *extra]


def test_demo_run_trains_exports_and_resumes(tmp_path, capsys):
    assert distill_run.main(_args(tmp_path, "--config.trainer.max_steps=2")) == 0
    out = capsys.readouterr().out
    assert "distilled 2 steps" in out and "held-out KL(teacher || student) per token:" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["trainer"]["max_steps"] == 2 and config["data"]["demo"]["levels"] == ["easy"]
    train = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 2 * 2 and all(t["injection"] == "stepwise" for t in train)
    assert any(block for t in train for block in t["step_injections"])
    assert (tmp_path / "data" / "pool.jsonl").exists()
    assert all(json.loads((tmp_path / f / "config_key.json").read_text())["hash"] for f in ("data", "train", "student"))
    rows = [json.loads(line) for line in (tmp_path / "train" / "metrics" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    evals = [json.loads(line) for line in (tmp_path / "train" / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 2]  # eval_at_start, then the end

    student = load_checkpoint(tmp_path / "student")
    assert (tmp_path / "student" / "tokenizer.json").exists()
    first = np.asarray(student.embed[...])

    # A second call finds the finished run and the demo data on disk and trains no further.
    assert distill_run.main(_args(tmp_path, "--config.trainer.max_steps=2")) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(load_checkpoint(tmp_path / "student").embed[...]), first)
    assert nnx.state(student)  # the export is a complete model


@pytest.mark.parametrize("flag, message", [
    ("--config.trainer.epoch=3", "config.trainer.epoch: unknown key (did you mean config.trainer.epochs?)"),
    ("--config.trainer.step.divergence.kind=klx", "config.trainer.step.divergence.kind: 'klx' is not one of"),
    ("--config.model.remat=sometimes", "config.model.remat: 'sometimes' is not one of"),
])
def test_configuration_mistakes_are_refused_before_any_work(tmp_path, capsys, flag, message):
    assert cli.main(["distill", *_args(tmp_path, flag)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("expint distill: ") and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def _outputs_of(tmp_path, *flags):
    """``tmp_path`` as a finished run of ``_args(tmp_path, *flags)`` looks to the stale-output check."""
    config = bind(distill_run.DistillRunConfig, parse_command_line("test", _args(tmp_path, *flags),
                                                                   distill_run.DEFAULT_CONFIG))
    for artefact in distill_run.ARTEFACTS:
        distill_run._claim(config, artefact)
        (tmp_path / artefact.folder / "made.txt").write_text("an output")
    storage.write_json(tmp_path / "config.json", to_dict(config))
    return {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("flag, stale", [
    ("--config.data.demo.mistake_rate=0.5", "data/, train/, student/ made with config.data.demo.mistake_rate=0.3 (now 0.5)"),
    ("--config.trainer.epochs=3", "train/, student/ made with config.trainer.epochs=1 (now 3)"),
])
def test_a_rerun_with_other_values_is_refused_naming_them(tmp_path, capsys, flag, stale):
    made = _outputs_of(tmp_path)
    assert cli.main(["distill", *_args(tmp_path, flag)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"expint distill: {tmp_path} holds outputs of another configuration: {stale}" in err
    assert "rerun with --overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == made  # config.json included
    # Display-only values are no new configuration (the check passes; the run is then stopped at the model).
    assert distill_run.stale_outputs(bind(distill_run.DistillRunConfig, parse_command_line(
        "test", _args(tmp_path, "--config.trainer.progress_bar=True"), distill_run.DEFAULT_CONFIG))) == []


def test_an_output_folder_without_its_key_is_refused(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    assert cli.main(["distill", *_args(tmp_path)]) == 2
    assert "train/ made without a config_key.json" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["train"]


@pytest.mark.slow
def test_overwrite_rebuilds_only_the_stale_outputs(tmp_path, capsys):
    """The README's second example (``--config.trainer.epochs=3`` after the main job), end to end."""
    assert distill_run.main(_args(tmp_path, "--config.trainer.max_steps=1")) == 0
    data_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()}
    assert distill_run.main(_args(tmp_path, "--config.trainer.max_steps=2", "--overwrite")) == 0
    assert "resumed from step 0" in capsys.readouterr().out  # train/ was rebuilt ...
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()} == data_files  # ... data/ reused
    assert json.loads((tmp_path / "config.json").read_text())["trainer"]["max_steps"] == 2

    assert distill_run.main(_args(tmp_path, "--config.data.demo.mistake_rate=0.5", "--overwrite")) == 0
    assert json.loads((tmp_path / "config.json").read_text())["data"]["demo"]["mistake_rate"] == 0.5
    key = json.loads((tmp_path / "data" / "config_key.json").read_text())["key"]
    assert key["data.demo"]["mistake_rate"] == 0.5


def test_show_config_prints_every_field_and_writes_nothing(tmp_path, capsys):
    assert cli.main(["distill", *_args(tmp_path), "--show-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"config.output_dir = '{tmp_path}'" in lines
    assert "config.trainer.epochs = 1" in lines and "config.data.demo.levels = ['easy']" in lines
    assert "config.trainer.step.divergence.kind = 'forward_kl'" in lines
    assert not list(tmp_path.iterdir())


def test_eval_files_that_give_no_example_are_refused_naming_the_files(chat, tmp_path):
    train, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    storage.write_jsonl(train, [make_trajectory(1, task_id="a").to_json()])
    storage.write_jsonl(eval_path, [make_trajectory(4, task_id=f"e{i}").to_json() for i in range(2)])
    config = bind(distill_run.DistillRunConfig, {
        "output_dir": str(tmp_path / "run"), "trainer": {},
        "data": {"train": [str(train)], "eval": [str(eval_path)],
                                                         "budget": {"max_student_tokens": 20, "overflow": "drop"}}})
    with pytest.raises(ValueError, match=rf"config\.data\.eval=\['{eval_path}'\]: none of its 2 trajectories gives "
                                         r"a usable example \(counts: .*'dropped_too_long': 2"):
        distill_run.run_examples(config, chat, splits=("eval",))
    roomy = bind(distill_run.DistillRunConfig, {"output_dir": str(tmp_path / "run"), "trainer": {},
                                                 "data": {"train": [str(train)]}})
    sets = distill_run.run_examples(roomy, chat)
    assert sets["eval"] is None and sets["train"].counts.kept == 1  # no eval files: no eval set
