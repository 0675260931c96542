"""Kill ``expint run`` with SIGKILL at points spread over every stage, rerun it each time, and
compare the result with an uninterrupted run of the same configuration.

    python -m tests.loop.kill_resume [WORKDIR]

A kill point is a file pattern inside the run directory (a rollout batch of a stage, a trainer
checkpoint, ...): the run is killed as soon as a file matching it appears. After every kill the
finished stages are recorded; the next run must not redo any of them (their ``done.json`` stays
byte-identical). At the end the pools, the evaluation results and the policies' parameters must
equal the uninterrupted run's, bitwise (the scripted policy acts, the trainer resumes bitwise on CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "loop_tiny.py"
OVERRIDES = ("--config.iterations=2", "--config.policy.backend=reference", "--config.simweb.train_tasks_per_level=6",
             "--config.simweb.levels=('easy','medium')", "--config.extract.samples=4", "--config.extract.batch_tasks=3",
             "--config.distill.samples=3", "--config.trainer.epochs=2", "--config.trainer.checkpoint_every=1",
             "--config.extract.warm_start=True")
# Spread over all stages of both iterations; each is met after the previous one in the schedule.
KILL_POINTS = ("iter_000/rollouts.partial/rollouts_0000.jsonl", "iter_000/data.partial/teacher_0000.jsonl",
               "iter_000/train.partial/trainer/checkpoints/1", "iter_000/eval.partial/global_0000.jsonl",
               "iter_001/rollouts.partial/rollouts_0001.jsonl", "iter_001/train.partial/trainer/metrics/train.jsonl",
               "iter_001/eval.partial/none_0000.jsonl")


def _command(runs_dir: Path) -> list[str]:
    return [sys.executable, "-m", "expint_jax.cli", "run", f"--config={CONFIG}", f"--config.runs_dir={runs_dir}",
            *OVERRIDES]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def markers(run_dir: Path) -> dict[str, bytes]:
    return {str(p.parent.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.glob("iter_*/*/done.json"))}


def run_to_end(runs_dir: Path, cache: Path) -> None:
    done = subprocess.run(_command(runs_dir), env=_env(cache), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"expint run failed ({done.returncode}):\n{done.stderr[-3000:]}")


def run_killed_at(runs_dir: Path, cache: Path, pattern: str, timeout: float = 1200) -> bool:
    """Runs until ``pattern`` exists in the run directory, then SIGKILLs; False if the run ended first."""
    run_dir = runs_dir / "loop_tiny"
    process = subprocess.Popen(_command(runs_dir), env=_env(cache), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            if list(run_dir.glob(pattern)):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern} did not appear within {timeout} s")
            time.sleep(0.05)
        if process.returncode != 0:
            raise RuntimeError(f"expint run failed ({process.returncode}):\n{process.stderr.read()[-3000:]}")
        return False
    finally:
        if process.poll() is None:
            process.kill()


def _without_wall_time(path: Path) -> bytes:
    """A trajectory file without each rollout's ``metadata.elapsed_s`` (wall time differs run to run)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row.get("metadata", {}).pop("elapsed_s", None)
    return json.dumps(rows, sort_keys=True).encode()


def outcome(run_dir: Path) -> dict[str, bytes]:
    """What must not depend on the kills: pools, evaluation results, accepted data, trained parameters."""
    files = {}
    for pattern in ("iter_*/extract/pool.jsonl", "iter_*/eval/eval.json", "iter_*/base_eval/eval.json",
                    "iter_*/train/policy/model.safetensors"):
        files.update({str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.glob(pattern))})
    files.update({str(p.relative_to(run_dir)): _without_wall_time(p)
                  for p in sorted(run_dir.glob("iter_*/data/accepted.jsonl"))})
    return files


def check(workdir: Path) -> dict[str, object]:
    cache = workdir / "xla_cache"
    reference, killed = workdir / "reference", workdir / "killed"
    run_to_end(reference, cache)
    kills, redone = [], []
    for pattern in KILL_POINTS:
        before = markers(killed / "loop_tiny")
        if run_killed_at(killed, cache, pattern):
            kills.append(pattern)
        after = markers(killed / "loop_tiny")
        redone += [stage for stage, marker in before.items() if after.get(stage) != marker]
    before = markers(killed / "loop_tiny")
    run_to_end(killed, cache)
    after = markers(killed / "loop_tiny")
    redone += [stage for stage, marker in before.items() if after.get(stage) != marker]
    want, got = outcome(reference / "loop_tiny"), outcome(killed / "loop_tiny")
    differing = sorted(name for name in set(want) | set(got) if want.get(name) != got.get(name))
    return {"kills": kills, "redone": redone, "differing": differing, "files_compared": len(want)}


def main() -> int:
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="kill_resume_"))
    result = check(workdir)
    print(result)
    return 0 if len(result["kills"]) >= 5 and not result["redone"] and not result["differing"] else 1


if __name__ == "__main__":
    sys.exit(main())
