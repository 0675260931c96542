"""Math word problems: seeded generation, a numeric verifier, and the sandboxed ``python`` tool.

Five families -- rates, percentages, unit conversions, combinatorics, multi-step arithmetic --
each at easy / medium / hard. Answers are computed exactly (``fractions.Fraction``). A problem
whose exact answer is not a terminating decimal asks for rounding ("Round to 2 decimal places")
and is verified with an absolute tolerance of half a unit in the last place (plus 1e-9), so both
2.86 and 2.857 pass for 20/7; every other answer is verified with a relative tolerance of 1e-9.

``verify(prediction, gold, ...)`` reads the number robustly (``final_number``): the content of
the last ``<answer>…</answer>`` or ``\\boxed{…}`` if present, LaTeX fractions, then
``expint_jax.rollout.judge.parse_number`` ("$1,234.50", "12 apples", "3/4", "1.2e5", "x = 5").
Tasks are deterministic for a given ``MathConfig`` (each task has its own seeded stream).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from expint_jax.models.chat import parse_answer
from expint_jax.rollout.envs.base import Task
from expint_jax.rollout.judge import numbers_close, parse_number
from expint_jax.rollout.python_tool import PythonTool
from expint_jax.rollout.sandbox import Sandbox
from expint_jax.rollout.tools import Tool

LEVELS = ("easy", "medium", "hard")
EXACT_REL_TOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    value: Fraction  # the exact answer
    decimals: int | None = None  # the question asks to round to this many decimals

    @property
    def gold(self) -> str:
        exact = Decimal(self.value.numerator) / Decimal(self.value.denominator)
        if self.decimals is not None:
            return format(exact.quantize(Decimal(1).scaleb(-self.decimals), rounding=ROUND_HALF_UP), "f")
        if self.value.denominator == 1:
            return str(self.value.numerator)
        text = format(exact, "f")
        if Fraction(text) != self.value:
            raise ValueError(f"{self.value} is not a terminating decimal; the problem must ask for rounding")
        return text

    @property
    def abs_tol(self) -> float:
        return 0.0 if self.decimals is None else 0.5 * 10.0 ** -self.decimals + 1e-9


# --- families: each maps (rng, level) to a Problem ---------------------------------------------


def _rates(rng: random.Random, level: str) -> Problem:
    if level == "easy":
        v, t = rng.randint(20, 90), rng.randint(2, 9)
        return Problem(f"A car travels at a constant {v} km/h for {t} hours. How many kilometres does it travel?",
                       Fraction(v * t))
    if level == "medium":
        a, m, b = rng.randint(6, 30), rng.randint(2, 9), rng.randint(40, 400)
        return Problem(f"A printer prints {a} pages every {m} minutes. At this rate, how many minutes does it "
                       f"take to print {b} pages? Round to 2 decimal places.", Fraction(b * m, a), 2)
    while True:
        a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(3, 20)
        rate = Fraction(1, a) + Fraction(1, b) - Fraction(1, c)
        if rate > 0:
            break
    return Problem(f"Pipe A fills a tank in {a} hours and pipe B fills it in {b} hours, while a drain empties the "
                   f"full tank in {c} hours. With both pipes and the drain open, how many hours does it take to "
                   "fill the empty tank? Round to 2 decimal places.", 1 / rate, 2)


def _percentages(rng: random.Random, level: str) -> Problem:
    if level == "easy":
        p, n = rng.choice((5, 10, 12, 15, 20, 25, 30, 40, 45, 60, 75)), rng.randint(20, 2000)
        return Problem(f"What is {p}% of {n}?", Fraction(p * n, 100))
    if level == "medium":
        price, d, t = rng.randint(20, 400), rng.choice((10, 15, 20, 25, 30, 35)), rng.choice((5, 6, 7, 8, 9))
        final = Fraction(price) * (1 - Fraction(d, 100)) * (1 + Fraction(t, 100))
        return Problem(f"A jacket costs ${price}. It is discounted by {d}%, and then a sales tax of {t}% is added "
                       "to the discounted price. What is the final price in dollars? Round to the nearest cent.",
                       final, 2)
    u, d, final = rng.choice((10, 20, 25, 30, 40, 50)), rng.choice((10, 15, 20, 25, 30)), rng.randint(50, 900)
    original = Fraction(final) / ((1 + Fraction(u, 100)) * (1 - Fraction(d, 100)))
    return Problem(f"A price rises by {u}% and then falls by {d}%, ending at ${final}. What was the original price "
                   "in dollars? Round to the nearest cent.", original, 2)


def _units(rng: random.Random, level: str) -> Problem:
    if level == "easy":
        h, m = rng.randint(1, 12), rng.randint(1, 59)
        return Problem(f"How many minutes are there in {h} hours and {m} minutes?", Fraction(60 * h + m))
    if level == "medium":
        v = rng.randint(5, 250)
        return Problem(f"Convert {v} km/h to metres per second. Round to 2 decimal places.", Fraction(v * 1000, 3600),
                       2)
    a, b, c, r = rng.randint(20, 120), rng.randint(20, 120), rng.randint(20, 120), rng.randint(2, 15)
    return Problem(f"A tank measures {a} cm by {b} cm by {c} cm. It is filled with water at {r} litres per minute "
                   "(1 litre = 1000 cm³). How many minutes does it take to fill the empty tank? Round to 2 decimal "
                   "places.", Fraction(a * b * c, 1000 * r), 2)


_WORDS = ("BANANA", "LETTER", "SUCCESS", "MISSISSIPPI", "BOOKKEEPER", "COMMITTEE", "STATISTICS", "ASSESSMENT",
          "PEPPER", "TOMORROW", "BALLOON", "REFERENCE")


def _combinatorics(rng: random.Random, level: str) -> Problem:
    if level == "easy":
        n = rng.randint(5, 15)
        k = rng.randint(2, min(4, n - 1))
        return Problem(f"In how many ways can a team of {k} be chosen from {n} people?", Fraction(math.comb(n, k)))
    if level == "medium":
        word = rng.choice(_WORDS)
        count = math.factorial(len(word))
        for repeats in Counter(word).values():
            count //= math.factorial(repeats)
        return Problem(f"How many distinct arrangements are there of the letters of the word {word}?",
                       Fraction(count))
    men, women = rng.randint(4, 9), rng.randint(4, 9)
    k = rng.randint(3, 5)
    j = rng.randint(1, min(k, women) - 1)
    count = sum(math.comb(women, i) * math.comb(men, k - i) for i in range(j, min(k, women) + 1))
    return Problem(f"A committee of {k} people is chosen from {men} men and {women} women. How many different "
                   f"committees contain at least {j} women?", Fraction(count))


_NAMES = ("Sam", "Priya", "Jonas", "Amara", "Lee", "Marta", "Tomas", "Keiko")


def _cents(amount: int) -> str:
    return f"${amount // 100}.{amount % 100:02d}"


def _arithmetic(rng: random.Random, level: str) -> Problem:
    if level == "easy":
        name, count, price = rng.choice(_NAMES), rng.randint(2, 9), 25 * rng.randint(4, 19)
        bill = next(b for b in (2000, 5000, 10000) if b >= count * price)
        return Problem(f"{name} buys {count} notebooks at {_cents(price)} each and pays with a {_cents(bill)} bill. "
                       f"How much change does {name} receive, in dollars?", Fraction(bill - count * price, 100))
    if level == "medium":
        cows, hens, weeks = rng.randint(3, 40), rng.randint(10, 200), rng.randint(1, 6)
        cow_kg, hen_g = rng.randint(8, 25), rng.randint(90, 150)
        per_day = Fraction(cows * cow_kg) + Fraction(hens * hen_g, 1000)
        return Problem(f"A farm has {cows} cows and {hens} hens. Each cow eats {cow_kg} kg of feed per day and each "
                       f"hen eats {hen_g} g per day. How many kilograms of feed does the farm use in {weeks} weeks?",
                       per_day * 7 * weeks)
    single, pack_size = 5 * rng.randint(10, 60), rng.randint(3, 12)
    pack = single * pack_size - 5 * rng.randint(1, 4 * pack_size)
    n = rng.randint(pack_size + 1, 6 * pack_size)
    best = min(j * pack + (n - j * pack_size) * single for j in range(n // pack_size + 1))
    return Problem(f"Pens cost {_cents(single)} each, or {_cents(pack)} for a pack of {pack_size}. What is the "
                   f"least amount, in dollars, needed to buy exactly {n} pens?", Fraction(best, 100))


FAMILIES: dict[str, Callable[[random.Random, str], Problem]] = {
    "rates": _rates,
    "percentages": _percentages,
    "units": _units,
    "combinatorics": _combinatorics,
    "arithmetic": _arithmetic,
}


# --- verification ------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_LATEX_FRACTION = re.compile(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}")


def final_number(text: str) -> float | None:
    """The number a final answer states (see the module docstring), or None."""
    answer = parse_answer(text)
    if answer is not None:
        text = answer
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    text = _LATEX_FRACTION.sub(r"(\1)/(\2)", text).replace("(", "").replace(")", "")
    text = text.replace("\\,", "").replace("\\%", "%").replace("\\$", "$").replace("{,}", ",")
    return parse_number(text)


def verify(prediction: str | None, gold: str, *, abs_tol: float = 0.0, rel_tol: float = EXACT_REL_TOL) -> bool:
    if prediction is None:
        return False
    value, expected = final_number(prediction), parse_number(gold)
    if expected is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    return value is not None and numbers_close(value, expected, rel_tol=rel_tol, abs_tol=abs_tol)


# --- environment -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MathConfig:
    seed: int = 0
    split: str = "train"
    tasks_per_level: int = 100
    levels: tuple[str, ...] = LEVELS
    families: tuple[str, ...] = tuple(FAMILIES)

    def __post_init__(self) -> None:
        if not self.levels or any(level not in LEVELS for level in self.levels):
            raise ValueError(f"MathConfig.levels must be a non-empty subset of {LEVELS}, got {self.levels!r}")
        unknown = [f for f in self.families if f not in FAMILIES]
        if not self.families or unknown:
            raise ValueError(f"MathConfig.families must be a non-empty subset of {tuple(FAMILIES)}, got {unknown}")
        if self.tasks_per_level < 1:
            raise ValueError(f"MathConfig.tasks_per_level must be >= 1, got {self.tasks_per_level}")


def generate_tasks(config: MathConfig) -> list[Task]:
    """Families rotate within each level, so every family gets an equal share."""
    tasks = []
    for level in config.levels:
        for i in range(config.tasks_per_level):
            family = config.families[i % len(config.families)]
            rng = random.Random(f"math:{config.seed}:{config.split}:{level}:{i}")
            problem = FAMILIES[family](rng, level)
            rel_tol = EXACT_REL_TOL if problem.decimals is None else 0.0
            tasks.append(Task(f"math-{config.split}-{config.seed}-{level}-{i:05d}", problem.question, problem.gold,
                              {"level": level, "family": family, "abs_tol": problem.abs_tol, "rel_tol": rel_tol}))
    return tasks


class MathEnv:
    name = "math"

    def __init__(self, config: MathConfig = MathConfig(), sandbox: Sandbox | None = None):
        self.config = config
        self._tasks = tuple(generate_tasks(config))
        self._sandbox = sandbox

    def tasks(self) -> Sequence[Task]:
        return self._tasks

    def tools(self, task: Task) -> Sequence[Tool]:
        return (self._python,)

    @functools.cached_property
    def _python(self) -> PythonTool:  # built on first use: probing the sandbox's isolation starts processes
        return PythonTool(self._sandbox or Sandbox())

    def score(self, task: Task, prediction: str | None) -> float:
        if task.answer is None:
            raise ValueError(f"math task {task.task_id!r} has no gold answer")
        ok = verify(prediction, task.answer, abs_tol=task.metadata.get("abs_tol", 0.0),
                    rel_tol=task.metadata.get("rel_tol", EXACT_REL_TOL))
        return 1.0 if ok else 0.0
