"""The organism's measurement script: it runs, and the designed ordering shows (global < none < step-wise)."""

from expint_jax.rollout.envs.simweb.measure import evaluate, fading_pools, format_rows, main, offline_pool
from expint_jax.rollout.envs.simweb.reference_agent import Mistakes


def test_measure_prints_effects_pool_table_and_iterations(capsys):
    assert main(["--eval-tasks", "6", "--samples", "2", "--train-tasks-per-level", "4", "--iterations", "2"]) == 0
    out = capsys.readouterr().out
    assert "Designed effects" in out and "| none |" in out and "| stepwise |" in out and "iteration 1:" in out


def test_default_measurement_orders_the_injections_as_designed():
    mistakes = Mistakes(0.35, 0.35, 0.35)
    pool = offline_pool(mistakes, seed=0, tasks_per_level=20, samples=4, granularity="principle")
    rows = {r.injection: r for r in evaluate(pool, mistakes, seed=0, eval_tasks=40, samples=4)}
    assert rows["global"].accuracy < rows["none"].accuracy < rows["stepwise"].accuracy, format_rows(rows.values())
    assert rows["global"].premature > 0.2 and rows["none"].premature == rows["stepwise"].premature == 0.0
    assert rows["global, no finishing lesson"].premature == 0.0
    insensitive = evaluate(pool, mistakes, seed=0, eval_tasks=12, samples=2, sensitivity=None)
    assert len({r.accuracy for r in insensitive}) == 1  # today's agent: experience changes nothing


def test_fading_mistakes_lose_their_lessons():
    steps = fading_pools(Mistakes(0.35, 0.35, 0.35), iterations=4, fade=0.3, seed=0, tasks_per_level=20, samples=4,
                         granularity="principle")
    assert steps[0].gained and any(step.lost for step in steps[1:])
    assert len(steps[-1].pool) < len(steps[0].pool)
