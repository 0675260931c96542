"""Run the cells of the paper's comparison over seeds; write one table and one figure per comparison.

    python launch/run_cells.py configs/simweb_demo.py configs/simweb_demo_instance.py \
        configs/simweb_demo_global.py configs/simweb_demo_on_policy.py configs/simweb_demo_sft.py \
        --seeds 0 1 2 [--jobs 1] [--set key=value ...] [--out cells] [--dry-run]

Every config is a cell; the first is the reference (the recipe: principle + stepwise +
off_policy). Each cell runs once per seed as its own ``expint run`` (``<runs_dir>/<cell>_s<S>``;
a seed sets ``config.seed`` (every rollout) and ``trainer.batching.seed`` (the training order);
the SimWeb worlds and π_0 stay fixed: ``expint_jax/loop/cells.py``). Every run is bound and
checked before any starts; a finished run is only read back, an unfinished one resumes; ``--jobs``
runs that many at once (each its own process and memory); ``--set`` applies to every run.

Then, into ``--out``: ``granularity``, ``injection`` and ``regime`` ``.md`` + ``.png`` (each cell
one axis away from the reference against it: mean and 95 % t-interval across seeds per iteration
of internalized accuracy, in-context accuracy, premature-answer rate and assistant turns),
``cells.md`` (every table and this command) and ``cells.json`` (``expint_jax/loop/comparison.py``).
Exit status 2 on a configuration mistake (one line, nothing started), 1 when a run failed (the
outputs then hold what finished, and name the failed runs).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from expint_jax.cli import errors
from expint_jax.config import ConfigError, to_dict


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = errors.ArgumentParser(prog="launch/run_cells.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="loop config files, one per cell; the first is the reference")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds, one run each (default 0 1 2)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run (repeatable)")
    parser.add_argument("--out", default="cells", help="folder for the tables and figures (default ./cells)")
    parser.add_argument("--dry-run", action="store_true", help="print each run's expint command and state; run none")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be >= 1")
    from expint_jax.loop.cells import expint_run_command, is_finished, plan_runs, run_all
    from expint_jax.loop.comparison import CellResult, write_comparisons

    try:
        runs = plan_runs(args.configs, seeds=args.seeds, overrides=args.set)
    except ConfigError as e:
        return errors.refuse("run_cells", e)
    if args.dry_run:
        for run in runs:
            state = "finished" if is_finished(run) else "to run"
            print(f"# {run.label}: {state}\n{shlex.join(expint_run_command(run.argv))}")
        return 0
    outcomes = run_all(runs, jobs=args.jobs)
    cells = []
    for name in dict.fromkeys(run.cell for run in runs):
        mine = [run for run in runs if run.cell == name]
        cells.append(CellResult.read(name, mine[0].config_file, to_dict(mine[0].config),
                                     {run.seed: run.run_dir for run in mine}))
    failed = [o.run.label for o in outcomes if o.status == "failed"]
    command = shlex.join(["python", "launch/run_cells.py", *argv])
    written = write_comparisons(args.out, cells, reference=runs[0].cell, command=command, failed=failed)
    print((Path(args.out) / "cells.md").read_text())
    print("written: " + ", ".join(str(p) for p in written))
    if failed:
        print(f"run_cells: {len(failed)} run(s) failed: {', '.join(failed)} (see their logs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
