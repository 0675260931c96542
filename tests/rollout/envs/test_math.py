"""Math environment: seeded problems with independently checked answers, the verifier, the python tool."""

import itertools
import math
import re
from fractions import Fraction

import pytest

from expint_jax.rollout.envs.math import FAMILIES, MathConfig, MathEnv, Problem, final_number, verify
from expint_jax.rollout.sandbox import Sandbox, SandboxLimits


@pytest.fixture(scope="module")
def env():
    return MathEnv(MathConfig(seed=4, tasks_per_level=40), sandbox=Sandbox(SandboxLimits(wall_time_s=20)))


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"(?<![\d.])\d+(?![\d.])", text)]


def test_tasks_are_seeded_balanced_and_unique(env):
    tasks = env.tasks()
    assert len(tasks) == 3 * 40 and len({t.task_id for t in tasks}) == len(tasks)
    assert MathEnv(MathConfig(seed=4, tasks_per_level=40)).tasks() == tasks
    assert MathEnv(MathConfig(seed=5, tasks_per_level=40)).tasks() != tasks
    mix = {(t.metadata["level"], t.metadata["family"]) for t in tasks}
    assert mix == {(level, family) for level in ("easy", "medium", "hard") for family in FAMILIES}
    assert all(env.score(t, t.answer) == 1.0 for t in tasks)


def _solve_independently(task) -> float | None:
    """Brute-force or direct solutions for the families whose numbers can be read off the text."""
    q, level, family = task.question, task.metadata["level"], task.metadata["family"]
    n = _numbers(q)
    if family == "percentages" and level == "easy":
        return n[0] * n[1] / 100
    if family == "units" and level == "easy":
        return 60 * n[0] + n[1]
    if family == "rates" and level == "easy":
        return n[0] * n[1]
    if family == "combinatorics" and level == "easy":
        return len(list(itertools.combinations(range(n[1]), n[0])))
    if family == "combinatorics" and level == "medium":
        word = re.search(r"word ([A-Z]+)\?", q).group(1)
        if len(word) <= 8:
            return len(set(itertools.permutations(word)))
    if family == "combinatorics" and level == "hard":
        k, men, women, j = n
        people = [("m", i) for i in range(men)] + [("w", i) for i in range(women)]
        return sum(sum(p[0] == "w" for p in c) >= j for c in itertools.combinations(people, k))
    if family == "arithmetic" and level == "hard":
        prices = [float(p) for p in re.findall(r"\$(\d+\.\d\d)", q)]
        pack_size = int(re.search(r"pack of (\d+)", q).group(1))
        count = int(re.search(r"exactly (\d+) pens", q).group(1))
        return min(packs * prices[1] + singles * prices[0]
                   for packs in range(count + 1) for singles in range(count + 1)
                   if packs * pack_size + singles == count)
    if family == "rates" and level == "hard":
        a, b, c = n[:3]
        return 1 / (1 / a + 1 / b - 1 / c)
    return None


def test_answers_agree_with_independent_solutions(env):
    checked = 0
    for task in MathEnv(MathConfig(seed=9, tasks_per_level=60)).tasks():
        expected = _solve_independently(task)
        if expected is None:
            continue
        checked += 1
        assert verify(str(expected), task.answer, abs_tol=task.metadata["abs_tol"] + 1e-9,
                      rel_tol=max(task.metadata["rel_tol"], 1e-9)), (task.question, task.answer, expected)
    assert checked >= 60


def test_rounded_answers_accept_either_precision():
    problem = Problem("?", Fraction(20, 7), decimals=2)
    assert problem.gold == "2.86"
    for text in ("2.86", "2.857", "about 2.857 hours", "<answer>2.857142</answer>"):
        assert verify(text, problem.gold, abs_tol=problem.abs_tol, rel_tol=0.0), text
    assert not verify("2.87", problem.gold, abs_tol=problem.abs_tol, rel_tol=0.0)
    assert Problem("?", Fraction(2345, 1000), decimals=2).gold == "2.35"  # half up
    with pytest.raises(ValueError, match="terminating"):
        Problem("?", Fraction(1, 3)).gold


@pytest.mark.parametrize("text, value", [
    ("$1,234.50", 1234.5), ("12 apples", 12), ("3/4", 0.75), ("1.2e5", 120000), ("1.2 x 10^5", 120000),
    ("\\boxed{\\frac{3}{4}}", 0.75), ("<answer>x = 5</answer>", 5), ("-7 degrees", -7), ("2 1/2 cups", 2.5),
    ("4.2 million", 4_200_000), ("25%", 25),
])
def test_final_number_reads_common_formats(text, value):
    assert final_number(text) == pytest.approx(value)


def test_verify_rejects_ambiguous_missing_and_wrong_answers():
    assert not verify(None, "12") and not verify("twelve", "12") and not verify("12 or 13", "12")
    assert not verify("12.0001", "12") and not verify("3628801", "3628800") and verify("12.0000000001", "12")
    with pytest.raises(ValueError, match="not a number"):
        verify("1", "many")


def test_python_tool_computes_an_answer_that_scores(env):
    task = next(t for t in env.tasks() if t.metadata["family"] == "combinatorics" and t.metadata["level"] == "easy")
    k, n = _numbers(task.question)
    (tool,) = env.tools(task)
    assert tool.spec.name == "python"
    output = tool({"code": f"import math\nprint(math.comb({n}, {k}))"})
    assert output == str(math.comb(n, k))
    assert env.score(task, f"<answer>{output}</answer>") == 1.0
    assert env.score(task, str(math.comb(n, k) + 1)) == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="families"):
        MathConfig(families=("geometry",))
    with pytest.raises(ValueError, match="levels"):
        MathConfig(levels=())
