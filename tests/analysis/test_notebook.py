"""``notebooks/loss_landscape.ipynb`` runs headless (matplotlib's Agg backend) on a tiny finished run."""

import json
from pathlib import Path

import numpy as np
import pytest

from expint_jax import storage
from expint_jax.distill import run as distill_run
from expint_jax.distill.metrics_log import read_metrics
from expint_jax.rollout.envs.simweb.demo import DemoData, demo_trajectories

matplotlib = pytest.importorskip("matplotlib")  # the `notebooks` extra

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "loss_landscape.ipynb"


def _tiny_run(output_dir: Path, *extra: str) -> None:
    args = [f"--config.output_dir={output_dir}", "--config.data.demo.train_tasks_per_level=1",
            "--config.data.demo.eval_tasks_per_level=1", "--config.data.demo.levels=('easy',)",
            "--config.data.demo.rollouts_per_task=2", "--config.trainer.epochs=1", "--config.trainer.batching.rows=2",
            "--config.trainer.progress_bar=False", "--config.trainer.optimizer.warmup_steps=0", *extra]
    assert distill_run.main(args) == 0


def _execute_notebook(run_dir: Path, monkeypatch, line_points: int) -> dict:
    """Executes every code cell in one namespace, from the notebook's directory, as Jupyter would."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, value in {"RUN": run_dir, "LINE_POINTS": line_points, "PLANE_POINTS": 2, "MAX_EXAMPLES": 2}.items():
        monkeypatch.setenv(f"EXPINT_LANDSCAPE_{name}", str(value))
    monkeypatch.chdir(NOTEBOOK.parent)
    namespace = {"__name__": "__main__"}
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}, code cell {i}", "exec"), namespace)
    plt.close("all")
    return namespace


def test_notebook_runs_on_a_run_with_eval_data(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _tiny_run(run_dir)
    ns = _execute_notebook(run_dir, monkeypatch, line_points=5)  # alphas -0.5, 0, 0.5, 1, 1.5
    assert ns["METRIC"] == "kl" and ns["source"] == "held-out" and len(ns["data"]) == 2
    line = {p["alpha"]: p for p in ns["line"]}
    initial_eval, final_eval = read_metrics(run_dir / "train" / "metrics" / "eval.jsonl")  # eval_at_start, the end
    # the end points are the trainer's own evaluations (same examples, same aggregation)
    assert line[0.0]["kl"] == pytest.approx(initial_eval["kl"], rel=1e-5)
    assert line[1.0]["kl"] == pytest.approx(final_eval["kl"], rel=1e-5) and line[1.0]["kl"] != line[0.0]["kl"]
    assert ns["grid"].shape == (2, 2) and np.all(np.isfinite(ns["grid"]))


@pytest.mark.slow  # a second tiny run and notebook (~1 min on a shared 2-core CPU)
def test_notebook_runs_on_an_nll_run_without_eval_data(tmp_path, monkeypatch):
    trajectories, _, _ = demo_trajectories(
        DemoData(train_tasks_per_level=1, eval_tasks_per_level=1, levels=("easy",), rollouts_per_task=2),
        tmp_path / "demo")
    train_file = tmp_path / "train.jsonl"  # user data, with no eval file
    storage.write_jsonl(train_file, [t.to_json() for t in trajectories])
    run_dir = tmp_path / "sft"
    _tiny_run(run_dir, f"--config.data.train=('{train_file}',)", "--config.trainer.step.divergence.kind=nll")
    assert not (run_dir / "train" / "metrics" / "eval.jsonl").exists()
    ns = _execute_notebook(run_dir, monkeypatch, line_points=2)
    assert ns["METRIC"] == "loss" and ns["source"] == "train"
    assert all("kl" not in p and np.isfinite(p["loss"]) for p in ns["line"])
    assert np.all(np.isfinite(ns["grid"]))
