"""Who does what when the loop runs as several JAX processes (multi-controller, one per host).

Every process runs ``expint run`` with the same arguments (``launch/``); ``jax.distributed`` joins
them. The decisions, and why:

  * **Process 0 acts.** Every stage but ``train`` (rollouts, extraction with its writer, the
    evaluations, the teacher's rollouts and their judging, the step-wise selector's calls) runs on
    process 0 alone. It loads π_k from the run directory (or builds π_0 from its seed) onto
    ``acting_mesh``: process 0's own devices, with the run's tensor axis and the rest as fsdp.
    These stages enter no collective, so nothing another process does can deadlock them. The
    alternative, every process running the agent in lockstep so that the local engine's sampler
    could be sharded over all hosts, would repeat every tool call, endpoint call and judge call
    once per process and needs identical host randomness everywhere; it is not done. Hence π_k
    must fit on one host's devices to act through the local engine; the scale path is
    ``policy.backend='server'``, whose server process 0 starts on its host for the stage.
  * **The others wait, then read.** Process 0 hands each stage's outcome (its summary, or its
    error) to the other processes through the coordination service
    (``parallel.coordination.Processes.leader_runs``; deadlines and errors are described there)
    and the stage's files through the shared file system: a process that is told a stage was
    published checks that it sees ``done.json`` (``await_published``) before going on. The run
    directory must therefore be on a file system every host mounts.
  * **Everybody trains.** ``train`` (``SPMD_STAGES``) runs on every process over the global mesh:
    each reads the published data, builds the same examples and feeds its own rows
    (``distill.pipeline``); the jitted steps, the held-out KL measurements and the export of
    π_{k+1} (gathered by ``models.hf.save_checkpoint``) are collectives that every process enters
    in the same order. Process 0 claims the stage folder before and publishes it after. The
    on-policy regime samples the student between training rounds inside this stage: process 0
    does it alone, with its own copy of the student (π_k, or the student the previous round
    exported), and the others read the samples it wrote once they see them (``stages._student_samples``,
    ``await_visible``).
  * **One writer per artefact.** Process 0 writes every stage folder, marker (``claim.json``,
    ``done.json``), pool, evaluation, the report with its plots and TensorBoard scalars, the run's
    ``config.json`` and ``stopped.json``; the trainer writes its metrics (JSONL, TensorBoard) and
    ``data_counts.json`` on process 0 only. The exception is the trainer's orbax checkpoint, which
    orbax writes collectively: each process writes the array shards it holds, process 0 the
    metadata.

``check`` refuses, at start-up and on every process, what cannot work under several processes: a
mesh that leaves out some process's devices, a batch whose rows do not split evenly over the
processes, and an acting mesh process 0's devices cannot form.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expint_jax.config import ConfigError
from expint_jax.loop import layout
from expint_jax.loop.config import LoopConfig
from expint_jax.parallel.coordination import Processes
from expint_jax.parallel.mesh import MeshConfig, make_mesh

if TYPE_CHECKING:
    import jax

SPMD_STAGES = frozenset({"train"})  # every process runs these; process 0 alone runs the rest
VISIBLE_WAIT_S = 120.0  # a shared file system may show another host's rename this late


def check(config: LoopConfig, mesh: jax.sharding.Mesh, processes: Processes) -> None:
    """``ConfigError`` for a configuration that cannot run on ``processes`` (see the module docstring)."""
    if processes.count == 1:
        return
    import jax

    n = processes.count
    rows = config.trainer.batching.rows
    if rows % n:
        raise ConfigError(f"config.trainer.batching.rows={rows}: every one of the {n} processes feeds the same number "
                          "of rows; choose a multiple of the process count")
    spanned = {d.process_index for d in mesh.devices.flat}
    if spanned != set(range(n)):
        raise ConfigError(f"config.mesh: the mesh uses the devices of processes {sorted(spanned)} only, but {n} "
                          f"processes run and each one trains on its own devices; use every device "
                          f"(config.mesh.devices=0, now {config.mesh.devices})")
    leader_devices = jax.local_devices(process_index=0)
    try:
        acting_mesh(config.mesh, leader_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: process 0 acts on its own {len(leader_devices)} devices with the run's "
                          f"tensor axis, and cannot: {e}") from None


def acting_mesh(config: MeshConfig, devices: list[Any] | None = None) -> jax.sharding.Mesh:
    """Process 0's devices (``devices``; default its local ones) laid out for acting: the run's
    tensor axis, the rest fsdp."""
    import jax

    return make_mesh(MeshConfig(data=1, fsdp=-1, tensor=config.tensor),
                     jax.local_devices() if devices is None else devices)


def acting_run(run: Any, processes: Processes) -> Any:
    """``run`` as process 0 acts with it: on ``acting_mesh`` when several processes run (the same
    ``Run`` otherwise), with actors (policy servers) of its own; stage hashes stay shared. The
    caller stops its server (``stop_serving``)."""
    if processes.count == 1:
        return run
    return dataclasses.replace(run, mesh=acting_mesh(run.config.mesh), _actors=None)


def await_published(folder: layout.StageDir, processes: Processes) -> None:
    """Returns once this process sees ``folder``'s ``done.json`` that process 0 published; raises
    ``ConfigError`` naming the path when it does not appear (a run directory that is not shared)."""
    await_visible(folder.final / layout.DONE, processes, what=folder.stage, ready=folder.is_done)


def await_visible(path: Path, processes: Processes, *, what: str, ready: Callable[[], bool] | None = None) -> None:
    """Returns once ``ready()`` (default: ``path`` exists) holds here for a file that process 0 wrote
    for ``what``; raises ``ConfigError`` naming ``path`` when it does not within ``VISIBLE_WAIT_S``."""
    ready = ready or path.exists
    deadline = time.monotonic() + VISIBLE_WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise ConfigError(f"process {processes.index}: process 0 published {what} but {path} is not visible "
                               f"here after {VISIBLE_WAIT_S:.0f} s; the run directory (config.runs_dir) must be on "
                               "a file system every host shares")
        time.sleep(0.5)
