"""Cells of a comparison run over seeds: ``plan_runs`` binds every (config, seed) run before any
work, ``run_all`` hands the unfinished ones to ``expint run`` child processes (``jobs`` at a time)
and only reads back the finished ones.

A cell is one loop config (its ``name``). With seeds, seed S of cell C is its own run
``<runs_dir>/C_sS`` made with ``--config.seed=S --config.trainer.batching.seed=S
--config.name=C_sS``. What a seed changes:
  * ``config.seed`` seeds every rollout of the run (``stages.Run.seed``): π_k's extraction
    rollouts, the distillation samples (the teacher's for off_policy / sft, the student's rounds
    for on_policy), the held-out trajectories of the KL figure, and the evaluations (one seed
    shared by every policy of a run: common random numbers within a run, fresh ones across runs);
  * ``trainer.batching.seed`` seeds the order of the training examples and batches; ``config.seed``
    alone does not reach the trainer, hence both.
What a seed does not change: the SimWeb worlds (``simweb.seed``: the same training and held-out
tasks in every run), π_0's weights (``model.checkpoint``, or the tiny model's ``model.seed``) and
the offline writer (deterministic given its rollouts). So the spread across seeds is that of the
sampling and of the training order on fixed tasks, not that of the task draw.

A run is *finished* when its ``config.json`` equals this run's bound configuration (``expint
run`` writes it only after every stage's key has checked out against the disk) and every stage of
the schedule is published, or the loop stopped early (``stopped.json``, ``on_empty=stop``: a rerun
would stop at the same place). A finished run starts no process. Anything else goes to ``expint
run``, which resumes it (finished stages skipped, a killed one continued) or refuses a changed
setting in one line; that run then counts as failed, its log (``<runs_dir>/<run>.log``, appended
per launch) says why, and the other runs go on.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from expint_jax import storage
from expint_jax.config import ConfigError, bind, parse_command_line, to_dict
from expint_jax.loop import layout
from expint_jax.loop.config import LoopConfig, check_config

# Set per seed by ``plan_runs``; an override of one of them would make the seeds' runs collide.
SEED_KEYS = ("seed", "trainer.batching.seed", "name")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    cell: str  # the config's own name
    config_file: str
    seed: int | None  # None: the config as given (no per-seed run)
    argv: tuple[str, ...]  # ``expint run`` arguments
    config: LoopConfig  # bound and checked

    @property
    def run_dir(self) -> Path:
        return Path(self.config.runs_dir) / self.config.name

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")

    @property
    def label(self) -> str:
        return self.config.name


@dataclasses.dataclass(frozen=True)
class Outcome:
    run: PlannedRun
    status: Literal["done earlier", "ran", "failed"]
    detail: str = ""  # failed: the exit status and the log's last line


def _bind(file: str, argv: list[str], where: str) -> LoopConfig:
    try:
        config = bind(LoopConfig, parse_command_line("expint run", argv, file))
        check_config(config)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


def plan_runs(config_files: Sequence[str], *, seeds: Sequence[int] | None = None,
              overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """Every run, bound and checked (``ConfigError`` naming the config, nothing started): one per
    config without ``seeds``, else one per config and seed (see the module docstring)."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: expected KEY=VALUE")
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds >= 0")
        clash = [o for o in overrides if o.split("=", 1)[0] in SEED_KEYS]
        if clash:
            raise ConfigError(f"--set {clash[0]}: the runner sets {', '.join(SEED_KEYS)} for each seed")
    runs: list[PlannedRun] = []
    cells: dict[str, str] = {}
    for file in config_files:
        base_argv = [f"--config={file}", *(f"--config.{o}" for o in overrides)]
        base = _bind(file, base_argv, file)
        if base.name in cells:
            raise ConfigError(f"{file}: its cell name {base.name!r} is also {cells[base.name]}'s; "
                              "give each config its own name")
        cells[base.name] = file
        if seeds is None:
            runs.append(PlannedRun(base.name, file, None, tuple(base_argv), base))
            continue
        for seed in seeds:
            argv = [*base_argv, f"--config.seed={seed}", f"--config.trainer.batching.seed={seed}",
                    f"--config.name={base.name}_s{seed}"]
            runs.append(PlannedRun(base.name, file, seed, tuple(argv), _bind(file, argv, f"{file} (seed {seed})")))
    names = [r.run_dir for r in runs]
    clashes = sorted({str(n) for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"two runs would share the run directory {clashes[0]}; rename a cell")
    return runs


def is_finished(run: PlannedRun) -> bool:
    """The run's directory holds this very configuration, every stage published (or a stop)."""
    from expint_jax.loop.driver import schedule

    stored = run.run_dir / "config.json"
    if not stored.exists() or storage.read_json(stored) != json.loads(json.dumps(to_dict(run.config))):
        return False
    if (run.run_dir / "stopped.json").exists():
        return True
    return all(layout.StageDir(run.run_dir, stage).is_done() for stage in schedule(run.config.iterations))


def expint_run_command(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "expint_jax.cli", "run", *argv]


def _launch(run: PlannedRun, command: Callable[[Sequence[str]], list[str]], echo: Callable[[str], None]) -> Outcome:
    line = command(run.argv)
    run.log.parent.mkdir(parents=True, exist_ok=True)
    echo(f"{run.label}: running (log {run.log})")
    started = time.monotonic()
    with run.log.open("a", encoding="utf-8") as log:
        log.write(f"=== {shlex.join(line)}\n")
        log.flush()
        done = subprocess.run(line, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        lines = [s for s in run.log.read_text(encoding="utf-8", errors="replace").splitlines() if s.strip()]
        detail = f"exit status {done.returncode}: {lines[-1].strip() if lines else '(no output)'}"
        echo(f"{run.label}: failed ({detail}; log {run.log})")
        return Outcome(run, "failed", detail)
    echo(f"{run.label}: finished in {time.monotonic() - started:.0f} s")
    return Outcome(run, "ran")


def run_all(runs: Sequence[PlannedRun], *, jobs: int = 1, echo: Callable[[str], None] = print,
            command: Callable[[Sequence[str]], list[str]] = expint_run_command) -> list[Outcome]:
    """Runs the unfinished runs, ``jobs`` child processes at a time, in the given order; returns one
    outcome per run (same order). ``command`` turns ``expint run`` arguments into a command line."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1")
    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, run in enumerate(runs):
        if is_finished(run):
            echo(f"{run.label}: done earlier ({run.run_dir})")
            outcomes[i] = Outcome(run, "done earlier")
        else:
            todo.append(i)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on their child process
        for i, outcome in zip(todo, pool.map(lambda i: _launch(runs[i], command, echo), todo)):
            outcomes[i] = outcome
    return [outcomes[i] for i in range(len(runs))]
