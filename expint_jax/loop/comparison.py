"""The paper's comparisons over cells run with several seeds: intervals, tables, figures.

Input: per cell, its settings (the bound config as a dict) and its runs' directories, one per
seed, read by ``report.collect``. Per cell × policy π_j × evaluation mode × metric (``METRICS``:
the scalar figures of ``metrics.evaluate``), ``aggregate`` gives the mean across seeds and a 95 %
confidence interval from Student's t with n - 1 degrees of freedom (mean ± t · s / √n, s the
sample standard deviation): with 3 seeds the half-width is 4.30 · s / √3, where a normal
interval would claim 1.96 · s / √3. One seed gives a mean and no interval. A run without a
policy or mode (unfinished, or a mode the pool skipped) leaves it out, and n says so.

Comparisons (``AXES``), each between the reference cell (the paper's recipe: principle +
stepwise + off_policy) and the cells that differ from it on that axis alone among the three:
``granularity`` (extract.granularity), ``injection`` (injection.mode), ``regime``
(distill.regime). ``write_comparisons`` writes into ``out``: per comparison ``<axis>.md`` (the
table) and ``<axis>.png`` (four panels with error bars over π_0..π_K: internalized accuracy =
mode none; in-context accuracy = the cell's own injection mode, named in the legend; the
premature-answer rate and assistant turns, solid without experience, dashed in context; the bars
stop at what the metric can take, e.g. [0, 1] for a rate, while the tables give the whole interval), then
``cells.md`` (every table, every cell and mode, the runs, and the command) and ``cells.json``
(the aggregated numbers with each seed's value).
"""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from expint_jax import storage
from expint_jax.loop.report import MODES, collect

CONFIDENCE = 0.95
METRICS = ("accuracy", "pass_at_n", "best_single", "premature_answer_rate", "mean_assistant_turns",
           "mean_tool_calls", "mean_assistant_tokens")
AXES = {"granularity": "extract.granularity", "injection": "injection.mode", "regime": "distill.regime"}
INTERVAL_NOTE = ("mean ± half-width of the 95 % confidence interval across seeds (Student's t with n - 1 "
                 "degrees of freedom; one seed: the mean alone)")


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None with one value
    high: float | None
    values: tuple[float, ...]  # one per seed, in seed order

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "half_width": self.half_width,
                "n": self.n, "values": list(self.values)}

    def format(self, digits: int = 3, n: int | None = None) -> str:
        """``mean ± half``; ``(n=…)`` appended when ``n`` is given and differs from this count."""
        text = f"{self.mean:.{digits}f}" if self.half_width is None else \
            f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"
        return text if n is None or n == self.n else f"{text} (n={self.n})"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided t confidence interval (n - 1 degrees of freedom) of ``values``."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("t_interval: no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"t_interval: confidence must be in (0, 1), got {confidence}")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(mean, None, None, values)
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, values)


Aggregate = dict[int, dict[str, dict[str, Interval]]]  # policy j -> mode -> metric -> interval


def aggregate(collected: Sequence[Mapping[str, Any]], confidence: float = CONFIDENCE) -> Aggregate:
    """Intervals across runs (``report.collect`` outputs, one per seed) per policy, mode and metric."""
    values: dict[int, dict[str, dict[str, list[float]]]] = {}
    for data in collected:
        for j, result in data["policies"].items():
            for mode in MODES:
                metrics = result.get(mode)
                if not isinstance(metrics, Mapping) or "skipped" in metrics:
                    continue
                for name in METRICS:
                    value = metrics.get(name)
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                        values.setdefault(int(j), {}).setdefault(mode, {}).setdefault(name, []).append(float(value))
    return {j: {mode: {name: t_interval(v, confidence) for name, v in metrics.items()}
                for mode, metrics in sorted(modes.items())} for j, modes in sorted(values.items())}


def _setting(settings: Mapping[str, Any], dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = value[part]
    return value


@dataclasses.dataclass(frozen=True)
class CellResult:
    name: str
    config_file: str
    settings: Mapping[str, Any]  # the cell's bound config (seed 0's, or any seed's: they differ in seeds only)
    runs: Mapping[int | None, Path]  # seed -> run directory
    policies: Aggregate

    @classmethod
    def read(cls, name: str, config_file: str, settings: Mapping[str, Any], runs: Mapping[int | None, Path],
             confidence: float = CONFIDENCE) -> CellResult:
        """The cell's intervals from its runs on disk (a run not started yet counts as no data)."""
        collected = [collect(d) for _, d in sorted(runs.items(), key=lambda item: (item[0] is None, item[0] or 0))
                     if Path(d).is_dir()]
        return cls(name, config_file, settings, dict(runs), aggregate(collected, confidence))

    @property
    def in_context_mode(self) -> str:
        return _setting(self.settings, "injection.mode")

    def axis(self, name: str) -> Any:
        return _setting(self.settings, AXES[name])

    def get(self, j: int, mode: str, metric: str) -> Interval | None:
        return self.policies.get(j, {}).get(mode, {}).get(metric)


def comparisons(cells: Sequence[CellResult], reference: str) -> dict[str, list[CellResult]]:
    """Per axis (``AXES`` order): the reference cell, then the cells that differ from it on that
    axis alone among the three; an axis with no such cell is left out."""
    by_name = {c.name: c for c in cells}
    if reference not in by_name:
        raise ValueError(f"reference cell {reference!r} is not among the cells {sorted(by_name)}")
    ref = by_name[reference]
    found = {}
    for axis in AXES:
        others = [c for c in cells if c.name != reference and c.axis(axis) != ref.axis(axis)
                  and all(c.axis(a) == ref.axis(a) for a in AXES if a != axis)]
        if others:
            found[axis] = [ref, *others]
    return found


def _row_seeds(cell: CellResult, j: int) -> int:
    interval = cell.get(j, "none", "accuracy")
    return interval.n if interval else 0


def _cell_text(interval: Interval | None, digits: int, n: int) -> str:
    return "–" if interval is None else interval.format(digits, n)


def comparison_table(cells: Sequence[CellResult]) -> str:
    """One row per cell and policy: internalized and in-context accuracy, premature-answer rate and
    assistant turns in both, and the number of seeds."""
    lines = ["| cell | policy | internalized acc (none) | in-context acc | in-context mode | premature (none) | "
             "premature (in context) | turns (none) | turns (in context) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        mode = cell.in_context_mode
        for j in sorted(cell.policies):
            n = _row_seeds(cell, j)
            values = [_cell_text(cell.get(j, m, metric), digits, n)
                      for metric, m, digits in (("accuracy", "none", 3), ("accuracy", mode, 3),
                                                ("premature_answer_rate", "none", 3),
                                                ("premature_answer_rate", mode, 3),
                                                ("mean_assistant_turns", "none", 2),
                                                ("mean_assistant_turns", mode, 2))]
            lines.append(f"| {cell.name} | π_{j} | {values[0]} | {values[1]} | {mode} | " + " | ".join(values[2:])
                         + f" | {n} |")
        if not cell.policies:
            lines.append(f"| {cell.name} | – | no evaluation yet | | | | | | | 0 |")
    return "\n".join(lines) + "\n"


def all_cells_table(cells: Sequence[CellResult]) -> str:
    columns = (("accuracy", "acc", 3), ("pass_at_n", "pass@n", 3), ("best_single", "best1", 3),
               ("premature_answer_rate", "premature", 3), ("mean_assistant_turns", "turns", 2),
               ("mean_tool_calls", "tools", 2), ("mean_assistant_tokens", "tokens", 1))
    lines = ["| cell | policy | mode | " + " | ".join(label for _, label, _ in columns) + " | seeds |",
             "|" + "---|" * (len(columns) + 4)]
    for cell in cells:
        for j in sorted(cell.policies):
            for mode in MODES:
                metrics = cell.policies[j].get(mode)
                if not metrics:
                    continue
                n = metrics["accuracy"].n if "accuracy" in metrics else 0
                values = [_cell_text(metrics.get(name), digits, n) for name, _, digits in columns]
                lines.append(f"| {cell.name} | π_{j} | {mode} | " + " | ".join(values) + f" | {n} |")
    return "\n".join(lines) + "\n"


MODE_STYLE = {"none": "-", "in_context": "--"}
# What a metric can take: the figure's error bars stop there (a t-interval of few seeds does not).
RANGES = {"accuracy": (0.0, 1.0), "premature_answer_rate": (0.0, 1.0), "mean_assistant_turns": (0.0, math.inf)}


def comparison_figure(cells: Sequence[CellResult], title: str):
    """The four panels of the module docstring (a matplotlib ``Figure``; the caller saves or closes it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = ((axes[0, 0], "accuracy", ("none",), "internalized accuracy (no experience)", "accuracy (Avg. Pass@n)"),
              (axes[0, 1], "accuracy", ("in_context",), "in-context accuracy (E_k in context)",
               "accuracy (Avg. Pass@n)"),
              (axes[1, 0], "premature_answer_rate", ("none", "in_context"), "premature-answer rate",
               "answered with no tool call"),
              (axes[1, 1], "mean_assistant_turns", ("none", "in_context"), "assistant turns",
               "assistant turns per rollout"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    spread = 0.06
    for ax, metric, kinds, panel_title, ylabel in panels:
        for i, cell in enumerate(cells):
            offset = spread * (i - (len(cells) - 1) / 2)
            for kind in kinds:
                mode = "none" if kind == "none" else cell.in_context_mode
                points = [(j, cell.get(j, mode, metric)) for j in sorted(cell.policies)]
                points = [(j, iv) for j, iv in points if iv is not None]
                if not points:
                    continue
                xs = [j + offset for j, _ in points]
                ys = [iv.mean for _, iv in points]
                low, high = RANGES[metric]
                yerr = [[0.0 if iv.low is None else iv.mean - max(iv.low, low) for _, iv in points],
                        [0.0 if iv.high is None else min(iv.high, high) - iv.mean for _, iv in points]]
                label = cell.name if kind == "none" else f"{cell.name} ({mode})"
                ax.errorbar(xs, ys, yerr=yerr, fmt="o" + MODE_STYLE[kind], color=colors[i % len(colors)],
                            capsize=3, label=label if len(kinds) == 1 else None)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("policy π_j (π_0 = base; π_{k+1} after iteration k)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if len(kinds) == 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    handles = [Line2D([], [], color="gray", ls=MODE_STYLE["none"], marker="o", label="no experience"),
               Line2D([], [], color="gray", ls=MODE_STYLE["in_context"], marker="o",
                      label="in context (the cell's mode)")]
    axes[1, 0].legend(handles=handles, fontsize=8)
    fig.suptitle(f"{title}: mean ± 95 % t-interval across seeds", fontsize=11)
    fig.tight_layout()
    return fig


def _figure_png(cells: Sequence[CellResult], title: str) -> bytes:
    import matplotlib.pyplot as plt

    fig = comparison_figure(cells, title)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _heading(axis: str, cells: Sequence[CellResult]) -> str:
    values = " vs ".join(f"{c.name} ({c.axis(axis)})" for c in cells)
    return f"{axis} ({AXES[axis]}): {values}"


def _seed_label(seed: int | None) -> str:
    return "–" if seed is None else str(seed)


def to_json(cells: Sequence[CellResult], found: Mapping[str, Sequence[CellResult]], *, reference: str,
            command: str, failed: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "command": command, "confidence": CONFIDENCE, "interval": INTERVAL_NOTE, "reference": reference,
        "cells": {c.name: {"config": c.config_file, "in_context_mode": c.in_context_mode,
                           "axes": {axis: c.axis(axis) for axis in AXES},
                           "runs": {_seed_label(s): str(d) for s, d in c.runs.items()},
                           "policies": {str(j): {mode: {name: iv.to_json() for name, iv in metrics.items()}
                                                 for mode, metrics in modes.items()}
                                        for j, modes in c.policies.items()}}
                  for c in cells},
        "comparisons": {axis: {"key": AXES[axis], "cells": [c.name for c in members],
                               "table": f"{axis}.md", "figure": f"{axis}.png"} for axis, members in found.items()},
        "failed": list(failed),
    }


def write_comparisons(out: str | Path, cells: Sequence[CellResult], *, reference: str, command: str,
                      failed: Sequence[str] = ()) -> list[Path]:
    """Writes the module docstring's files into ``out`` (each atomically); returns their paths.
    ``failed``: runs that did not finish this time (named in ``cells.md``; their data so far count)."""
    out = Path(out)
    found = comparisons(cells, reference)
    written = []
    sections = []
    for axis, members in found.items():
        heading = _heading(axis, members)
        table = comparison_table(members)
        storage.write_text(out / f"{axis}.md", f"# {heading}\n\nCommand: `{command}`\n\n{INTERVAL_NOTE}.\n\n"
                                               f"{table}\n![{axis}]({axis}.png)\n")
        storage.write_bytes(out / f"{axis}.png", _figure_png(members, heading))
        written += [out / f"{axis}.md", out / f"{axis}.png"]
        sections += [f"## {heading}", "", table, f"![{axis}]({axis}.png)", ""]
    compared = {c.name for members in found.values() for c in members}
    alone = [c.name for c in cells if c.name not in compared]
    lines = ["# The paper's comparisons over cells and seeds", "", f"Command: `{command}`", "",
             f"Reference cell: `{reference}`. Values: {INTERVAL_NOTE}. Policy π_0 is the base (iteration 0), "
             "π_{k+1} the result of iteration k. Internalized = mode `none` (no experience in context); in "
             "context = the cell's own injection mode with E_k (for π_0: E_0). Premature = answered with no "
             "tool call.", ""]
    if not found:
        lines += ["No comparison: no cell differs from the reference on exactly one of "
                  f"{', '.join(AXES.values())}.", ""]
    lines += sections
    lines += ["## Every cell and mode", "", all_cells_table(cells), "## Runs", "", "| cell | seed | run directory |",
              "|---|---|---|"]
    lines += [f"| {c.name} | {_seed_label(s)} | `{d}` |" for c in cells for s, d in c.runs.items()]
    if alone:
        lines += ["", f"In no comparison (not one axis away from `{reference}`): {', '.join(alone)}."]
    if failed:
        lines += ["", f"**Runs that did not finish** (their finished stages count above): {', '.join(failed)}."]
    storage.write_text(out / "cells.md", "\n".join(lines) + "\n")
    storage.write_json(out / "cells.json", to_json(cells, found, reference=reference, command=command, failed=failed))
    return [*written, out / "cells.md", out / "cells.json"]
