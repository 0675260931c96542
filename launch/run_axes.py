"""Run several loop configs (the cells of the paper's comparison) and tabulate their last iterations.

    python launch/run_axes.py configs/recipe.py configs/instance.py configs/global_injection.py \
        configs/on_policy.py configs/sft.py [--set key=value ...] [--out axes.md]

Each config runs through ``expint run`` (resumable: a finished cell is only read back), with the
``--set`` overrides applied to every cell (e.g. ``--set iterations=2 --set policy.backend=reference``).
The table has one row per cell and mode for the base π_0 and the final policy: accuracy (Avg.
Pass@n), Δ against π_0, premature-answer rate, assistant turns, and the cell's last held-out KL.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from expint_jax import storage
from expint_jax.loop.report import collect


def run_cell(config: str, overrides: list[str]) -> Path:
    """Runs one cell; returns its run directory (read from the command's final line)."""
    command = [sys.executable, "-m", "expint_jax.cli", "run", f"--config={config}",
               *(f"--config.{o}" for o in overrides)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config}: expint run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    report = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)[-1]
    return Path(report).parent


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="loop config files, one per cell")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every cell (repeatable)")
    parser.add_argument("--out", default="axes.md", help="where to write the table (Markdown)")
    args = parser.parse_args(argv)
    cells = {Path(config).stem: run_cell(config, args.set) for config in args.configs}
    text = table(cells)
    storage.write_text(args.out, text)
    print(text)
    print(f"table: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
