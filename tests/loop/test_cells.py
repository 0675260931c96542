"""Cells over seeds (``loop/cells.py``) and their comparison (``loop/comparison.py``, ``launch/run_cells.py``):
the t-interval and the aggregation on synthetic data, tables / figures / JSON from fake run
directories (the files ``report.collect`` reads), planning and resuming with a fake ``expint run``,
and the runner end to end on two tiny cells x two seeds (slow)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from expint_jax import storage
from expint_jax.config import ConfigError, to_dict
from expint_jax.loop import cells as cells_mod
from expint_jax.loop.comparison import (CellResult, Interval, aggregate, comparison_figure, comparison_table,
                                        comparisons, t_interval, write_comparisons)
from expint_jax.loop.driver import schedule
from expint_jax.loop.layout import StageDir

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "loop_tiny.py")
T_975 = {2: 12.706204736174698, 3: 4.302652729911275, 5: 2.7764451051977987}  # Student's t, 0.975 quantile, n-1 dof


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------- the interval


@pytest.mark.parametrize("values", [[0.2, 0.4], [0.2, 0.4, 0.6], [1.0, 2.0, 4.0, 8.0, 16.0]])
def test_t_interval_is_the_mean_plus_minus_t_times_the_standard_error(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    interval = t_interval(values)
    assert interval.mean == pytest.approx(mean) and interval.n == n and interval.values == tuple(values)
    assert interval.half_width == pytest.approx(T_975[n] * sd / math.sqrt(n))
    assert (interval.low, interval.high) == pytest.approx((mean - interval.half_width, mean + interval.half_width))


def test_t_interval_edge_cases():
    single = t_interval([0.3])
    assert (single.mean, single.low, single.high, single.half_width) == (0.3, None, None, None)
    assert single.format() == "0.300" and single.format(n=3) == "0.300 (n=1)"
    same = t_interval([0.5, 0.5, 0.5])
    assert same.half_width == pytest.approx(0.0) and same.format(2) == "0.50 ± 0.00"
    assert t_interval([0.2, 0.4, 0.6], confidence=0.5).half_width < t_interval([0.2, 0.4, 0.6]).half_width
    with pytest.raises(ValueError, match="no values"):
        t_interval([])


def _eval(accuracy, premature=0.0, turns=3.0):
    return {"accuracy": accuracy, "pass_at_n": min(1.0, accuracy + 0.1), "best_single": accuracy,
            "per_sample_accuracy": [accuracy], "premature_answer_rate": premature, "mean_assistant_turns": turns,
            "mean_tool_calls": turns - 1, "mean_assistant_tokens": 10.0 * turns, "terminations": {"answer": 4}}


def test_aggregate_pools_each_policy_mode_and_metric_across_seeds():
    seeds = [
        {"policies": {0: {"none": _eval(0.2), "stepwise": _eval(0.5, turns=4.0), "global": {"skipped": "empty"}},
                      1: {"none": _eval(0.3)}}},
        {"policies": {0: {"none": _eval(0.4), "stepwise": _eval(0.7, turns=5.0)}, 1: {"none": _eval(0.5)}}},
        {"policies": {0: {"none": _eval(0.6), "stepwise": _eval(0.6, turns=6.0)}}},  # iteration 0 unfinished
    ]
    result = aggregate(seeds)
    assert sorted(result) == [0, 1] and sorted(result[0]) == ["none", "stepwise"]  # a skipped mode is no data
    assert result[0]["none"]["accuracy"].values == (0.2, 0.4, 0.6)
    assert result[0]["none"]["accuracy"].mean == pytest.approx(0.4)
    assert result[0]["stepwise"]["mean_assistant_turns"].mean == pytest.approx(5.0)
    assert result[0]["stepwise"]["mean_assistant_turns"].half_width == pytest.approx(T_975[3] * 1.0 / math.sqrt(3))
    assert result[1]["none"]["accuracy"].n == 2  # the third seed has no π_1 yet
    assert "per_sample_accuracy" not in result[0]["none"] and "terminations" not in result[0]["none"]


# ---------------------------------------------------------------------- fake runs


def _settings(granularity="principle", mode="stepwise", regime="off_policy"):
    return {"extract": {"granularity": granularity}, "injection": {"mode": mode}, "distill": {"regime": regime}}


def _fake_run(run_dir: Path, results: dict[int, dict]) -> Path:
    """The published eval stages ``report.collect`` reads: π_0 from base_eval, π_{k+1} from iter_k/eval."""
    for j, result in results.items():
        stage = run_dir / "iter_000" / "base_eval" if j == 0 else run_dir / f"iter_{j - 1:03d}" / "eval"
        storage.write_json(stage / "eval.json", result)
        storage.write_json(stage / "done.json", {"summary": {}})
    return run_dir


def _fake_cell(tmp_path, name, settings, accuracy, in_context_mode="stepwise", premature=0.0):
    """A cell with seeds 0..2 and policies π_0..π_2; accuracy(seed, j) gives the internalized accuracy."""
    runs = {}
    for seed in range(3):
        results = {j: {"none": _eval(accuracy(seed, j)),
                       in_context_mode: _eval(accuracy(seed, j) + 0.2, premature=premature, turns=2.0)}
                   for j in range(3)}
        runs[seed] = _fake_run(tmp_path / "runs" / f"{name}_s{seed}", results)
    return CellResult.read(name, f"configs/{name}.py", settings, runs)


@pytest.fixture(scope="module")
def fake_cells(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fake_cells")
    return [
        _fake_cell(tmp_path, "recipe", _settings(), lambda s, j: 0.3 + 0.1 * j + 0.02 * s),
        _fake_cell(tmp_path, "instance", _settings(granularity="instance"), lambda s, j: 0.3 + 0.01 * s),
        _fake_cell(tmp_path, "global", _settings(mode="global"), lambda s, j: 0.25 + 0.02 * s,
                   in_context_mode="global", premature=0.6),
        _fake_cell(tmp_path, "on_policy", _settings(regime="on_policy"), lambda s, j: 0.3 - 0.05 * j),
        _fake_cell(tmp_path, "sft", _settings(regime="sft"), lambda s, j: 0.3 + 0.05 * j + 0.01 * s),
        _fake_cell(tmp_path, "two_axes", _settings(granularity="instance", mode="global"), lambda s, j: 0.1),
    ]


def test_each_comparison_is_the_reference_and_the_cells_one_axis_away(fake_cells):
    found = {axis: [c.name for c in members] for axis, members in comparisons(fake_cells, "recipe").items()}
    assert found == {"granularity": ["recipe", "instance"], "injection": ["recipe", "global"],
                     "regime": ["recipe", "on_policy", "sft"]}
    assert list(comparisons(fake_cells[:2], "recipe")) == ["granularity"]
    with pytest.raises(ValueError, match="reference cell 'nope'"):
        comparisons(fake_cells, "nope")


def test_the_comparison_table_shows_means_intervals_and_the_in_context_mode(fake_cells):
    recipe, _, glob = fake_cells[:3]
    text = comparison_table([recipe, glob])
    acc = t_interval([0.5, 0.52, 0.54])  # recipe π_2, mode none
    assert f"| recipe | π_2 | {acc.mean:.3f} ± {acc.half_width:.3f} | " in text
    rows = [line for line in text.splitlines() if line.startswith("| global | π_1 |")]
    assert len(rows) == 1 and "| global |" in rows[0][10:] and rows[0].endswith("| 3 |")
    assert "0.600 ± 0.000" in rows[0]  # the global cell's premature-answer rate in context
    assert len([line for line in text.splitlines() if line.startswith("| recipe |")]) == 3


def test_the_figure_has_four_panels_with_error_bars_at_the_means(fake_cells):
    import matplotlib.pyplot as plt

    recipe, _, glob = fake_cells[:3]
    fig = comparison_figure([recipe, glob], "injection")
    try:
        internalized, in_context, premature, turns = fig.axes
        assert "internalized" in internalized.get_title() and "in-context" in in_context.get_title()
        assert "premature" in premature.get_title() and "turns" in turns.get_title()
        assert [t.get_text() for t in in_context.get_legend().get_texts()] == ["recipe (stepwise)", "global (global)"]
        first = internalized.containers[0]  # recipe's error bars, π_0..π_2
        assert list(first.lines[0].get_ydata()) == pytest.approx([recipe.get(j, "none", "accuracy").mean
                                                                   for j in range(3)])
        assert first.has_yerr and len(internalized.containers) == 2
        assert len(premature.containers) == len(turns.containers) == 4  # both cells x (none, in context)
        assert min(premature.containers[3].lines[0].get_ydata()) == pytest.approx(0.6)
    finally:
        plt.close(fig)


def test_the_figure_stops_error_bars_at_the_range_of_a_rate(tmp_path):
    import matplotlib.pyplot as plt

    wide = _fake_cell(tmp_path, "wide", _settings(), lambda s, j: [0.0, 0.4, 0.8][s])  # 0.4 ± 0.99
    assert wide.get(0, "none", "accuracy").low < 0 and wide.get(0, "stepwise", "accuracy").high > 1
    fig = comparison_figure([wide], "wide")
    try:
        internalized, in_context = fig.axes[:2]
        for ax, (low, high) in ((internalized, (0.4 - 0.99, 0.4 + 0.99)), (in_context, (0.6 - 0.99, 0.6 + 0.99))):
            bars = ax.containers[0].lines[2][0].get_segments()
            assert all(seg[0][1] == pytest.approx(max(low, 0.0), abs=0.01) for seg in bars)
            assert all(seg[1][1] == pytest.approx(min(high, 1.0), abs=0.01) for seg in bars)
    finally:
        plt.close(fig)
    assert comparison_table([wide]).count("| 0.400 ± 0.994 |") == 3  # the table keeps the whole interval


def test_write_comparisons_writes_each_table_figure_and_the_combined_files(fake_cells, tmp_path):
    out = tmp_path / "out"
    written = write_comparisons(out, fake_cells, reference="recipe", command="python launch/run_cells.py X",
                                failed=["sft_s2"])
    names = sorted(p.name for p in written)
    assert names == sorted(["granularity.md", "granularity.png", "injection.md", "injection.png", "regime.md",
                            "regime.png", "cells.md", "cells.json"])
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    combined = (out / "cells.md").read_text()
    for axis in ("granularity", "injection", "regime"):
        assert (out / f"{axis}.md").read_text().count("| recipe | π_") == 3
        assert f"![{axis}]({axis}.png)" in combined
    assert "Command: `python launch/run_cells.py X`" in combined
    assert "In no comparison (not one axis away from `recipe`): two_axes." in combined
    assert "did not finish** (their finished stages count above): sft_s2" in combined
    data = json.loads((out / "cells.json").read_text())
    assert data["comparisons"]["regime"]["cells"] == ["recipe", "on_policy", "sft"] and data["failed"] == ["sft_s2"]
    entry = data["cells"]["on_policy"]["policies"]["2"]["none"]["accuracy"]
    assert entry["n"] == 3 and entry["values"] == pytest.approx([0.2, 0.2, 0.2]) and entry["half_width"] == 0
    assert data["cells"]["global"]["in_context_mode"] == "global" and data["cells"]["recipe"]["runs"]["1"].endswith(
        "recipe_s1")


def test_a_cell_whose_runs_have_not_started_has_no_data(tmp_path):
    cell = CellResult.read("recipe", "configs/recipe.py", _settings(), {0: tmp_path / "missing"})
    assert cell.policies == {} and "| recipe | – | no evaluation yet |" in comparison_table([cell])
    assert isinstance(t_interval([1.0, 2.0]), Interval)


# ---------------------------------------------------------------------- planning and running


def test_plan_runs_binds_one_run_per_config_and_seed(tmp_path):
    runs = cells_mod.plan_runs([TINY], seeds=[0, 3], overrides=[f"runs_dir={tmp_path}"])
    assert [(r.cell, r.seed, r.run_dir) for r in runs] == [("loop_tiny", 0, tmp_path / "loop_tiny_s0"),
                                                           ("loop_tiny", 3, tmp_path / "loop_tiny_s3")]
    assert runs[1].config.seed == runs[1].config.trainer.batching.seed == 3
    assert runs[1].argv[-3:] == ("--config.seed=3", "--config.trainer.batching.seed=3", "--config.name=loop_tiny_s3")
    assert runs[0].log == tmp_path / "loop_tiny_s0.log"
    alone = cells_mod.plan_runs([TINY], overrides=[f"runs_dir={tmp_path}"])
    assert [(r.seed, r.run_dir) for r in alone] == [(None, tmp_path / "loop_tiny")]


@pytest.mark.parametrize("kwargs, message", [
    (dict(seeds=[0], overrides=["seed=4"]), "--set seed=4: the runner sets seed"),
    (dict(seeds=[0, 0]), "--seeds 0 0: give distinct seeds"),
    (dict(seeds=[-1]), "give distinct seeds >= 0"),
    (dict(overrides=["iterations"]), "--set 'iterations': expected KEY=VALUE"),
    (dict(overrides=["bogus=1"]), r"loop_tiny.py: .*bogus"),
])
def test_plan_runs_refuses_bad_input_naming_it(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cells_mod.plan_runs([TINY], **kwargs)


def test_plan_runs_refuses_two_configs_with_one_cell_name():
    with pytest.raises(ConfigError, match="cell name 'loop_tiny' is also"):
        cells_mod.plan_runs([TINY, TINY], seeds=[0])


def _mark_finished(run: cells_mod.PlannedRun) -> None:
    storage.write_json(run.run_dir / "config.json", to_dict(run.config))
    for stage in schedule(run.config.iterations):
        storage.write_json(StageDir(run.run_dir, stage).final / "done.json", {"summary": {}})


FAKE_EXPINT = """
import sys
from pathlib import Path
name = [a for a in sys.argv[1:] if a.startswith("--config.name=")][0].split("=", 1)[1]
Path(sys.argv[1]).mkdir(exist_ok=True)
(Path(sys.argv[1]) / name).write_text(" ".join(sys.argv[2:]))
print("working on", name)
if "fail" in name:
    print("expint run: config.x: something is wrong")
    sys.exit(2)
"""


def test_run_all_reads_finished_runs_back_and_launches_the_rest(tmp_path):
    runs = cells_mod.plan_runs([TINY], seeds=[0, 1, 2], overrides=[f"runs_dir={tmp_path}"])
    _mark_finished(runs[1])
    calls = tmp_path / "calls"
    command = lambda argv: [sys.executable, "-c", FAKE_EXPINT, str(calls), *argv]  # noqa: E731
    echoed = []
    outcomes = cells_mod.run_all(runs, jobs=2, echo=echoed.append, command=command)
    assert [o.status for o in outcomes] == ["ran", "done earlier", "ran"]
    assert sorted(p.name for p in calls.iterdir()) == ["loop_tiny_s0", "loop_tiny_s2"]
    assert (calls / "loop_tiny_s2").read_text() == " ".join(runs[2].argv)
    assert "working on loop_tiny_s0" in runs[0].log.read_text()
    assert f"loop_tiny_s1: done earlier ({runs[1].run_dir})" in echoed
    # a finished run made with another configuration is not finished for this one
    other = cells_mod.plan_runs([TINY], seeds=[1], overrides=[f"runs_dir={tmp_path}", "iterations=2"])
    assert not cells_mod.is_finished(other[0])
    storage.write_json(runs[0].run_dir / "stopped.json", {"stage": "iter_000/data", "reason": "empty"})
    storage.write_json(runs[0].run_dir / "config.json", to_dict(runs[0].config))
    assert cells_mod.is_finished(runs[0])  # stopped early (on_empty=stop): a rerun stops at the same place


def test_run_all_reports_a_failed_run_with_its_log_and_goes_on(tmp_path):
    runs = cells_mod.plan_runs([TINY], seeds=[0], overrides=[f"runs_dir={tmp_path}"])
    failing = cells_mod.plan_runs([TINY], overrides=[f"runs_dir={tmp_path}", "name=fail"])
    command = lambda argv: [sys.executable, "-c", FAKE_EXPINT, str(tmp_path / "calls"), *argv]  # noqa: E731
    outcomes = cells_mod.run_all([*failing, *runs], echo=lambda line: None, command=command)
    assert [o.status for o in outcomes] == ["failed", "ran"]
    assert outcomes[0].detail == "exit status 2: expint run: config.x: something is wrong"
    with pytest.raises(ConfigError, match="--jobs 0"):
        cells_mod.run_all(runs, jobs=0, command=command)


def test_run_axes_reads_a_finished_cell_back_and_tabulates_its_last_iteration(tmp_path, capsys):
    run_axes = _launcher("run_axes")
    [run] = cells_mod.plan_runs([TINY], overrides=[f"runs_dir={tmp_path}"])
    _mark_finished(run)
    _fake_run(run.run_dir, {0: {"none": _eval(0.25)},
                            1: {"none": _eval(0.5), "heldout_kl": {"before": 0.1, "after": 0.05}}})
    out = tmp_path / "axes.md"
    assert run_axes.main([TINY, "--set", f"runs_dir={tmp_path}", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| loop_tiny | π_0 | none | 0.250 | +0.000 |" in text
    assert "| loop_tiny | π_1 | none | 0.500 | +0.250 | 0.000 | 3.00 | 0.0500 |" in text
    assert f"loop_tiny: done earlier ({run.run_dir})" in capsys.readouterr().out
    assert run_axes.main([TINY, "--set", "bogus=1"]) == 2


def test_run_cells_dry_run_prints_each_command_and_refuses_bad_input_on_one_line(tmp_path, capsys):
    run_cells = _launcher("run_cells")
    assert run_cells.main([TINY, "--seeds", "0", "1", "--set", f"runs_dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# loop_tiny_s0: to run" in out and "--config.name=loop_tiny_s1" in out and "-m expint_jax.cli run" in out
    assert not list(tmp_path.iterdir())
    assert run_cells.main([TINY, "--seeds", "0", "--set", "bogus=1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("run_cells: ") and "bogus" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- end to end


GLOBAL_CELL = """
from pathlib import Path
from expint_jax.config import load_config_file


def get_config():
    c = load_config_file(Path({tiny!r}))
    c.name = "loop_tiny_global"
    c.injection.mode = "global"
    return c
"""


def _finished_at(run_dir: Path) -> dict[str, float]:
    return {str(p): json.loads(p.read_text())["finished_at"] for p in sorted(run_dir.glob("iter_*/*/done.json"))}


@pytest.mark.slow  # four tiny loops as child processes (~1-2 min on a shared 2-core CPU)
def test_run_cells_end_to_end_on_two_tiny_cells_and_two_seeds_then_reads_back(tmp_path, capsys):
    run_cells = _launcher("run_cells")
    global_cell = tmp_path / "loop_tiny_global.py"
    global_cell.write_text(GLOBAL_CELL.format(tiny=TINY))
    # The scripted policy acts in every rollout and evaluation; accept_reward=2 accepts no teacher
    # trajectory, so train keeps π_0 and no run spends minutes compiling a trainer: this test is
    # about the runner (training in the loop is test_loop.py's).
    argv = [TINY, str(global_cell), "--seeds", "0", "1", "--set", "policy.backend=reference",
            "--set", "distill.accept_reward=2.0", "--set", f"runs_dir={tmp_path / 'runs'}",
            "--out", str(tmp_path / "out"), "--jobs", "2"]
    assert run_cells.main(argv) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert runs == ["loop_tiny_global_s0", "loop_tiny_global_s1", "loop_tiny_s0", "loop_tiny_s1"]
    data = json.loads((tmp_path / "out" / "cells.json").read_text())
    assert data["comparisons"] == {"injection": {"key": "injection.mode", "cells": ["loop_tiny", "loop_tiny_global"],
                                                 "table": "injection.md", "figure": "injection.png"}}
    for cell in ("loop_tiny", "loop_tiny_global"):
        for j in ("0", "1"):
            accuracy = data["cells"][cell]["policies"][j]["none"]["accuracy"]
            evaluated = [storage.read_json(tmp_path / "runs" / f"{cell}_s{s}" /
                                           ("iter_000/base_eval" if j == "0" else "iter_000/eval") / "eval.json")
                         for s in (0, 1)]
            assert accuracy["n"] == 2 and accuracy["values"] == [e["none"]["accuracy"] for e in evaluated]
    assert data["cells"]["loop_tiny_global"]["in_context_mode"] == "global"
    assert (tmp_path / "out" / "injection.png").read_bytes()[:4] == b"\x89PNG"
    assert "| loop_tiny_global | π_1 |" in (tmp_path / "out" / "injection.md").read_text()
    before = {run: _finished_at(tmp_path / "runs" / run) for run in runs}
    capsys.readouterr()
    assert run_cells.main(argv) == 0  # the rerun only reads back
    out = capsys.readouterr().out
    assert out.count(": done earlier (") == 4 and ": running" not in out
    assert {run: _finished_at(tmp_path / "runs" / run) for run in runs} == before
    assert json.loads((tmp_path / "out" / "cells.json").read_text()) == data
