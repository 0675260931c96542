"""``run_loop(config)``: the iterations of the paper, θ_{k+1} = Internalize(θ_k, E_k), stage by stage.

The schedule is, for k = 0 .. iterations-1: ``rollouts, extract, [base_eval if k == 0], data,
train, eval`` (``stages``). Before any work the driver computes every stage's key and checks it
against what is on disk (``layout.StageDir.check``): a finished or partial stage made with another
configuration stops the run at start-up with the stage and the differing keys, unless
``restart_from`` names it or an earlier stage, in which case that stage and everything after it
are removed first. Then finished stages are skipped (one line each) and the rest run in order;
each published whole (``layout``). After every evaluation the report is rewritten. A stage with
nothing to work with under ``on_empty="stop"`` ends the loop with one line and the report.

Several JAX processes (multi-host): every process runs ``run_loop`` with the same configuration;
process 0 restarts, checks, runs every stage but ``train`` and writes everything, the others wait
for each outcome and join ``train`` (``hosts`` says who does what and why;
``parallel.coordination`` how the others wait, with deadlines). Only process 0 echoes.

Raising: a failing stage (e.g. an unreachable writer endpoint) propagates after its partial
folder is left as it was (a rerun resumes it); completed stages are never touched.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from expint_jax import storage
from expint_jax.config import ConfigError, to_dict
from expint_jax.loop import acting, hosts, layout
from expint_jax.loop.config import LoopConfig
from expint_jax.loop.stages import STAGE_FUNCTIONS, STAGES, EmptyStage, Run, extraction_plan, stage_key
from expint_jax.parallel import coordination

log = logging.getLogger(__name__)


def schedule(iterations: int) -> list[layout.StageId]:
    return [layout.StageId(k, name) for k in range(iterations) for name in STAGES if k == 0 or name != "base_eval"]


def parse_restart(value: str, order: list[layout.StageId]) -> int:
    """Index in ``order`` of ``STAGE`` (its first occurrence) or ``iter_<k>/STAGE``."""
    match = re.fullmatch(r"(?:iter_(\d+)/)?(\w+)", value.strip())
    if match:
        k, name = (int(match.group(1)) if match.group(1) else None), match.group(2)
        for i, stage in enumerate(order):
            if stage.name == name and (k is None or stage.iteration == k):
                return i
    names = sorted({s.name for s in order})
    raise ConfigError(f"--restart-from {value!r}: not a stage of this run; give one of {', '.join(names)} "
                      f"or iter_<k>/<stage> with k < {max(s.iteration for s in order) + 1}")


@dataclasses.dataclass(frozen=True)
class LoopResult:
    run_dir: Path
    ran: tuple[str, ...]  # stages run by this call
    skipped: tuple[str, ...]  # stages found finished
    stopped: str | None  # why the loop stopped early (on_empty="stop"), if it did
    report: Path | None


def open_run(config: LoopConfig) -> Run:
    """The shared state of a run (tokenizer, mesh, worlds); nothing is written."""
    from expint_jax.models.chat import ChatFormat
    from expint_jax.models.tokenizer import load_tokenizer
    from expint_jax.parallel.mesh import make_mesh

    tokenizer = load_tokenizer(config.model.checkpoint or None)
    chat = ChatFormat(tokenizer, enable_thinking=config.model.enable_thinking)
    return Run(config, Path(config.runs_dir) / config.name, tokenizer, chat, make_mesh(config.mesh),
               acting.Worlds.of(config))


# The keys that make each environment's two worlds, named when they share tasks.
WORLD_KEYS = {"webwalker": "config.webwalker.train_file / config.webwalker.eval_file",
              "math": "config.math.train_split / config.math.test_split"}


def check_task_split(run: Run) -> None:
    """Evaluation and held-out tasks never overlap the extraction or teacher tasks (``ConfigError``).
    Extraction and teacher tasks may coincide (the paper distills on its extraction tasks), also
    for instance lessons, which may then state the answers of the teacher's tasks."""
    from expint_jax.experience.overlap import TaskOverlapError, check_task_overlap

    c = run.config
    ids = lambda tasks: [t.task_id for t in tasks]  # noqa: E731
    evaluation = ids(acting.pick(run.worlds.test.tasks(), c.eval.tasks))
    evaluation += ids(acting.pick(run.worlds.test.tasks(), c.distill.heldout_tasks))
    try:
        check_task_overlap(ids(acting.pick(run.worlds.train.tasks(), c.extract.tasks)),
                           ids(acting.pick(run.worlds.train.tasks(), c.distill.tasks)), evaluation,
                           granularity=c.extract.granularity, allow_instance_overlap=True)
    except TaskOverlapError as e:
        raise ConfigError(f"{WORLD_KEYS.get(c.env, f'config.{c.env}')}: the held-out world's tasks (config.eval.tasks, "
                          f"config.distill.heldout_tasks) must not be training-world tasks (config.extract.tasks, "
                          f"config.distill.tasks): {e}") from None


def plan(run: Run, order: list[layout.StageId]) -> dict[str, dict]:
    """Every stage's key, in order, checked against the disk (``StaleStageError`` on a mismatch)."""
    check_task_split(run)
    if run.config.extract.schedule == "release_steps":
        extraction_plan(run, 0)  # the extraction tasks fill the schedule's batches (else ConfigError)
    keys = {}
    for stage in order:
        key = stage_key(run, stage.iteration, stage.name)
        layout.StageDir(run.run_dir, stage).check(key)
        keys[str(stage)] = key
        run.stage_hashes[str(stage)] = layout.key_hash(key)
    return keys


# The stages each stage reads (iteration offset, name); rollouts read π_k, made by train of k-1.
INPUTS = {"rollouts": ((-1, "train"),), "extract": ((0, "rollouts"),), "base_eval": ((0, "extract"),),
          "data": ((0, "extract"),), "train": ((0, "data"),), "eval": ((0, "train"), (0, "extract"))}


def missing_inputs(run_dir: Path, stage: layout.StageId) -> list[layout.StageId]:
    needed = [layout.StageId(stage.iteration + offset, name) for offset, name in INPUTS[stage.name]]
    return [s for s in needed if s.iteration >= 0 and not layout.StageDir(run_dir, s).is_done()]


def run_loop(config: LoopConfig, *, restart_from: str | None = None, echo: Callable[[str], None] = print,
             run: Run | None = None, only: Sequence[layout.StageId] | None = None) -> LoopResult:
    """Runs (or resumes) the loop; see the module docstring. ``only``: run just these stages (each
    needs its inputs finished; ``expint eval`` / ``extract`` / ``distill`` on one iteration)."""
    run = run or open_run(config)
    processes = coordination.current()
    hosts.check(config, run.mesh, processes)
    if not processes.is_leader:
        echo(f"process {processes.index} of {processes.count}: process 0 acts and writes the run; this process "
             "joins the training steps")
        echo = _silent
    order = schedule(config.iterations)
    if only is not None:
        unknown = [str(s) for s in only if s not in order]
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: not a stage of this run ({config.iterations} iterations)")
        for stage in only:
            missing = missing_inputs(run.run_dir, stage)
            if missing and not all(m in only for m in missing):
                raise ConfigError(f"{stage} needs {', '.join(map(str, missing))} finished first "
                                  f"(expint run resumes the whole loop)")
    start = parse_restart(restart_from, order) if restart_from is not None else None
    keys: dict[str, dict] = {}

    def begin_run() -> None:
        if start is not None:
            removed = layout.restart(run.run_dir, order[start:])
            if removed:
                echo(f"restart from {order[start]}: removed {', '.join(map(str, removed))}")
        keys.update(plan(run, order))
        storage.write_json(run.run_dir / "config.json", to_dict(config))

    processes.leader_runs("start", begin_run)
    keys = keys or plan(run, order)  # the other processes: the same keys, after process 0's restart
    ran, skipped = [], []
    report_path = None
    for stage in order if only is None else [s for s in order if s in only]:
        outcome = _run_stage(run, stage, keys[str(stage)], processes)
        if outcome["state"] == "done":
            skipped.append(str(stage))
            echo(f"{stage}: done earlier ({_summary_line(outcome['summary'])})")
            continue
        if outcome["state"] == "stopped":
            message = f"{stage}: nothing to work with ({outcome['reason']}); on_empty=stop: the loop stops here"
            echo(message)
            report_path = _report(run, processes, echo, f"{stage} stopped")
            return LoopResult(run.run_dir, tuple(ran), tuple(skipped), message, report_path)
        summary = outcome["summary"]
        ran.append(str(stage))
        echo(f"{stage}: {_summary_line(summary)}")
        if summary.get("empty") and stage.name in ("extract", "data"):
            echo(f"{stage}: nothing to work with ({summary['empty']}); on_empty={config.on_empty}")
        if stage.name in ("base_eval", "eval"):
            report_path = _report(run, processes, None, f"{stage} report")
    processes.leader_runs("finish", lambda: (run.run_dir / "stopped.json").unlink(missing_ok=True))
    report_path = _report(run, processes, echo, "final report")
    return LoopResult(run.run_dir, tuple(ran), tuple(skipped), None, report_path)


def _run_stage(run: Run, stage: layout.StageId, key: dict, processes: coordination.Processes) -> dict[str, Any]:
    """Runs ``stage`` unless it is finished; ``{"state": "done" | "ran", "summary": ...}`` or
    ``{"state": "stopped", "reason": ...}`` on every process. Process 0 claims, publishes and writes
    (``hosts``): an acting stage runs on it alone, an SPMD stage on every process."""
    folder = layout.StageDir(run.run_dir, stage)
    function = STAGE_FUNCTIONS[stage.name]

    def claim() -> dict[str, Any]:
        if folder.is_done():
            return {"state": "done", "summary": folder.marker()["summary"]}
        folder.begin(key)
        return {"state": "begun"}

    def finish(summary: dict[str, Any] | None, stopped: str | None, started: float) -> dict[str, Any]:
        if stopped is not None:
            storage.write_json(run.run_dir / "stopped.json", {"stage": str(stage), "reason": stopped})
            return {"state": "stopped", "reason": stopped}
        summary = {**summary, "seconds": round(time.monotonic() - started, 2)}
        folder.publish(key, summary)
        return {"state": "ran", "summary": summary}

    def attempt(acting_run: Run) -> tuple[dict[str, Any] | None, str | None]:
        try:
            return function(acting_run, stage.iteration, folder.partial), None
        except EmptyStage as e:
            return None, str(e)
        finally:
            acting_run.stop_serving()  # a policy server lives for one stage, however the stage ends

    if stage.name in hosts.SPMD_STAGES:
        outcome = processes.leader_runs(f"{stage} (claim)", claim)
        if outcome["state"] == "done":
            return outcome
        started = time.monotonic()
        result = attempt(run)
        outcome = processes.leader_runs(f"{stage} (publish)", lambda: finish(*result, started))
    else:
        def act() -> dict[str, Any]:
            claimed = claim()
            if claimed["state"] == "done":
                return claimed
            started = time.monotonic()
            return finish(*attempt(hosts.acting_run(run, processes)), started)

        outcome = processes.leader_runs(str(stage), act)
    if outcome["state"] == "ran" and not processes.is_leader:
        hosts.await_published(folder, processes)
    return outcome


def _silent(line: str) -> None:
    log.info("%s", line)


def _report(run: Run, processes: coordination.Processes, echo: Callable[[str], None] | None, name: str) -> Path:
    from expint_jax.loop.report import write_report

    path = Path(processes.leader_runs(name, lambda: str(write_report(run.run_dir))))
    if echo is not None:
        echo(f"report: {path}")
    return path


def _summary_line(summary: dict) -> str:
    parts = []
    for name, value in summary.items():
        if isinstance(value, float):
            parts.append(f"{name}={value:.4g}")
        elif isinstance(value, (int, str)) or value is None:
            parts.append(f"{name}={value}")
    return ", ".join(parts)
