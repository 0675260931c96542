"""Run several loop configs (the cells of the paper's comparison) and tabulate their last iterations.

    python launch/run_axes.py configs/recipe.py configs/instance.py configs/global_injection.py \
        configs/on_policy.py configs/sft.py [--set key=value ...] [--out axes.md]

Each config runs once, as configured, through ``expint run`` (``expint_jax/loop/cells.py``: every
config bound and checked before any starts; a finished cell is only read back, an unfinished one
resumes; its log is ``<runs_dir>/<name>.log``), with the ``--set`` overrides applied to every cell
(e.g. ``--set iterations=2 --set policy.backend=reference``). The table has one row per cell and
mode for the base π_0 and the final policy: accuracy (Avg. Pass@n), Δ against π_0, premature-answer
rate, assistant turns, and the cell's last held-out KL. Several seeds per cell, intervals and
figures: ``launch/run_cells.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from expint_jax import storage
from expint_jax.cli import errors
from expint_jax.config import ConfigError
from expint_jax.loop.report import collect


def table(cells: dict[str, Path]) -> str:
    lines = ["| cell | policy | mode | accuracy | Δ vs π_0 | premature | turns | held-out KL after |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run_dir in cells.items():
        data = collect(run_dir)
        policies = data["policies"]
        if not policies:
            lines.append(f"| {name} | – | – | no evaluation yet | | | | |")
            continue
        last = max(policies)
        kl = policies[last].get("heldout_kl", {}).get("after")
        for j in sorted({0, last}):
            for mode in ("none", "global", "stepwise"):
                m = policies[j].get(mode)
                if not isinstance(m, dict) or "accuracy" not in m:
                    continue
                base = policies.get(0, {}).get(mode, {})
                delta = m["accuracy"] - base["accuracy"] if isinstance(base, dict) and "accuracy" in base else None
                lines.append(f"| {name} | π_{j} | {mode} | {m['accuracy']:.3f} | "
                             f"{'–' if delta is None else f'{delta:+.3f}'} | {m['premature_answer_rate']:.3f} | "
                             f"{m['mean_assistant_turns']:.2f} | {'–' if kl is None or j == 0 else f'{kl:.4f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = errors.ArgumentParser(prog="launch/run_axes.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="loop config files, one per cell")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every cell (repeatable)")
    parser.add_argument("--out", default="axes.md", help="where to write the table (Markdown)")
    args = parser.parse_args(argv)
    from expint_jax.loop.cells import plan_runs, run_all

    try:
        runs = plan_runs(args.configs, overrides=args.set)
    except ConfigError as e:
        return errors.refuse("run_axes", e)
    outcomes = run_all(runs)
    text = table({Path(run.config_file).stem: run.run_dir for run in runs})
    storage.write_text(args.out, text)
    print(text)
    print(f"table: {args.out}")
    failed = [o.run.label for o in outcomes if o.status == "failed"]
    if failed:
        print(f"run_axes: {len(failed)} cell(s) failed: {', '.join(failed)} (see their logs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
