"""The notebooks run through nbclient, in a real Jupyter kernel as a user runs them, on fresh runs:
``iterations.ipynb`` and ``loss_landscape.ipynb`` on a two-iteration ``configs/loop_tiny.py`` run
(SimWeb's scripted policy acting, so both iterations train), ``loss_landscape.ipynb`` also on
``expint distill`` runs (slow). A failing cell fails the test: nbclient's ``CellExecutionError`` carries
the cell's source and traceback. Every plot must be written as a PNG."""

import os
from pathlib import Path

import numpy as np
import pytest

from expint_jax import storage
from expint_jax.distill import run as distill_run
from expint_jax.distill.metrics_log import read_metrics
from expint_jax.loop import driver
from expint_jax.rollout.envs.simweb.demo import DemoData, demo_trajectories
from tests.loop.conftest import loop_config

nbformat = pytest.importorskip("nbformat")  # the `test` extra
nbclient = pytest.importorskip("nbclient")
image = pytest.importorskip("matplotlib.image")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
LANDSCAPE_PLOTS = ["lines.png", "path.png", "planes.png", "training_curves.png"]


def execute(name: str, monkeypatch, **env: object):
    """Runs every cell of ``notebooks/<name>`` in a fresh python3 kernel started in notebooks/, with
    ``env`` set; returns the executed notebook (its outputs)."""
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    # The kernel imports this checkout's package, whatever the environment has installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, startup_timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
                   if output.get("output_type") == "stream" and output.get("name") == "stdout")


def assert_plots(directory: Path, names: list[str]) -> None:
    """Exactly these PNG files, each a real figure (not a blank canvas)."""
    assert sorted(p.name for p in directory.glob("*.png")) == sorted(names)
    for name in names:
        pixels = image.imread(directory / name)
        assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 300, (name, pixels.shape)
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50, f"{name}: almost one colour"


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory) -> Path:
    """Two iterations with the scripted policy acting: real pools, held-out rollouts and training in
    each, so the landscape's path θ_0 → θ_1 → θ_2 has two trained segments."""
    runs = tmp_path_factory.mktemp("runs")
    config = loop_config(runs, iterations=2, policy__backend="reference", simweb__train_tasks_per_level=6,
                         extract__samples=4, extract__batch_tasks=3, distill__samples=3,
                         simweb__levels=("easy", "medium"))
    result = driver.run_loop(config, echo=lambda line: None)
    assert result.stopped is None
    return runs / "loop_tiny"


def test_the_iterations_notebook_runs_on_a_fresh_loop_run_and_saves_its_plots(loop_run, tmp_path, monkeypatch):
    out = tmp_path / "plots"
    notebook = execute("iterations.ipynb", monkeypatch, EXPINT_ITERATIONS_RUNS=loop_run, EXPINT_ITERATIONS_OUT=out)
    assert_plots(out, ["accuracy.png", "assistant_turns.png", "distillation.png", "pool_changes.png",
                       "premature_answers.png"])
    text = printed(notebook)
    assert "loop_tiny: policies [0, 1, 2], iterations [0, 1]" in text
    assert "iteration 0: +" in text and "iteration 1: +" in text


def test_the_loss_landscape_notebook_walks_every_iteration_of_a_loop_run(loop_run, tmp_path, monkeypatch):
    out = tmp_path / "landscape"
    # α = 0 and 1 only (each costs a full held-out evaluation on this CPU); a 2 x 2 plane.
    notebook = execute("loss_landscape.ipynb", monkeypatch, EXPINT_LANDSCAPE_RUN=loop_run, EXPINT_LANDSCAPE_OUT=out,
                       EXPINT_LANDSCAPE_LINE_POINTS=2, EXPINT_LANDSCAPE_EXTRAPOLATE=0,
                       EXPINT_LANDSCAPE_PLANE_POINTS=2)
    assert_plots(out, LANDSCAPE_PLOTS)
    numbers = storage.read_json(out / "landscape.json")
    assert numbers["metric"] == "kl" and [p["k"] for p in numbers["pairs"]] == [0, 1]
    for pair in numbers["pairs"]:
        k = pair["k"]
        trained = storage.read_json(loop_run / f"iter_{k:03d}" / "train" / "done.json")["summary"]
        assert trained["status"] == "trained" and pair["source"] == "held-out" and pair["examples"] == 2
        assert pair["end"] == str(loop_run / f"iter_{k:03d}" / "train" / "policy")
        assert pair["start"] == ("initial model" if k == 0 else str(loop_run / f"iter_{k - 1:03d}" / "train" / "policy"))
        # The segment's ends are the trainer's own held-out evaluations of θ_k and θ_{k+1}.
        line = {p["alpha"]: p["kl"] for p in pair["line"]}
        assert line[0.0] == pytest.approx(trained["kl_before"], rel=1e-5)
        assert line[1.0] == pytest.approx(trained["kl_after"], rel=1e-5) and line[1.0] != line[0.0]
        assert pair["relative_step"] > 0
        assert np.asarray(pair["plane"]["kl"]).shape == (2, 2) and np.all(np.isfinite(pair["plane"]["kl"]))
    assert "θ_0 → θ_1: 2 held-out examples" in printed(notebook)


def test_a_failing_cell_fails_the_run_and_names_its_source(tmp_path, monkeypatch):
    with pytest.raises(nbclient.exceptions.CellExecutionError) as failed:
        execute("loss_landscape.ipynb", monkeypatch, EXPINT_LANDSCAPE_RUN=tmp_path / "nothing",
                EXPINT_LANDSCAPE_OUT=tmp_path / "out")
    error = failed.value
    assert error.ename == "FileNotFoundError" and f"RUN={tmp_path / 'nothing'}: no config.json there" in error.evalue
    assert 'RUN = Path(os.environ.get("EXPINT_LANDSCAPE_RUN"' in str(error)  # the failing cell's source
    assert not (tmp_path / "out").exists()


def _distill_run(output_dir: Path, *extra: str) -> None:
    args = [f"--config.output_dir={output_dir}", "--config.data.demo.train_tasks_per_level=1",
            "--config.data.demo.eval_tasks_per_level=1", "--config.data.demo.levels=('easy',)",
            "--config.data.demo.rollouts_per_task=2", "--config.trainer.epochs=1", "--config.trainer.batching.rows=2",
            "--config.trainer.progress_bar=False", "--config.trainer.optimizer.warmup_steps=0", *extra]
    assert distill_run.main(args) == 0


@pytest.mark.slow  # a tiny distill run and a kernel (~100 s of CPU); the loop-run test covers the same cells
def test_the_loss_landscape_notebook_reads_a_distill_run(tmp_path, monkeypatch):
    run_dir, out = tmp_path / "run", tmp_path / "landscape"
    _distill_run(run_dir)
    # α = -1, 0, 1, 2 (the ends and one spacing past each); no plane.
    execute("loss_landscape.ipynb", monkeypatch, EXPINT_LANDSCAPE_RUN=run_dir, EXPINT_LANDSCAPE_OUT=out,
            EXPINT_LANDSCAPE_LINE_POINTS=2, EXPINT_LANDSCAPE_EXTRAPOLATE=0.5, EXPINT_LANDSCAPE_PLANE_POINTS=0)
    assert_plots(out, ["lines.png", "path.png", "training_curves.png"])
    (pair,) = storage.read_json(out / "landscape.json")["pairs"]
    assert pair["label"] == "initial → student" and pair["source"] == "held-out" and pair["examples"] == 2
    assert pair["plane"] is None
    line = {p["alpha"]: p["kl"] for p in pair["line"]}
    assert sorted(line) == [-1.0, 0.0, 1.0, 2.0]
    initial_eval, final_eval = read_metrics(run_dir / "train" / "metrics" / "eval.jsonl")  # eval_at_start, the end
    assert line[0.0] == pytest.approx(initial_eval["kl"], rel=1e-5)
    assert line[1.0] == pytest.approx(final_eval["kl"], rel=1e-5) and line[1.0] != line[0.0]


@pytest.mark.slow  # a tiny distill run and a kernel
def test_the_loss_landscape_notebook_reads_an_nll_run_without_eval_data(tmp_path, monkeypatch):
    trajectories, _, _ = demo_trajectories(
        DemoData(train_tasks_per_level=1, eval_tasks_per_level=1, levels=("easy",), rollouts_per_task=2),
        tmp_path / "demo")
    train_file = tmp_path / "train.jsonl"  # user data, with no eval file
    storage.write_jsonl(train_file, [t.to_json() for t in trajectories])
    run_dir, out = tmp_path / "sft", tmp_path / "landscape"
    _distill_run(run_dir, f"--config.data.train=('{train_file}',)", "--config.trainer.step.divergence.kind=nll")
    assert not (run_dir / "train" / "metrics" / "eval.jsonl").exists()
    execute("loss_landscape.ipynb", monkeypatch, EXPINT_LANDSCAPE_RUN=run_dir, EXPINT_LANDSCAPE_OUT=out,
            EXPINT_LANDSCAPE_LINE_POINTS=2, EXPINT_LANDSCAPE_EXTRAPOLATE=0, EXPINT_LANDSCAPE_PLANE_POINTS=2)
    numbers = storage.read_json(out / "landscape.json")
    assert numbers["metric"] == "loss" and numbers["pairs"][0]["source"] == "train"
    assert all("kl" not in p and np.isfinite(p["loss"]) for p in numbers["pairs"][0]["line"])
    assert np.all(np.isfinite(numbers["pairs"][0]["plane"]["loss"]))
    assert_plots(out, LANDSCAPE_PLOTS)
