"""Multi-host start-up: call ``jax.distributed.initialize`` exactly when more than one process runs.

A run is multi-process when the caller says so (``num_processes > 1`` or a coordinator address),
when the ``EXPINT_*`` environment variables below say so, or when a cluster launcher that JAX
understands does (SLURM with several tasks, Open MPI, a multi-host Cloud TPU slice). Otherwise it
is a no-op, so the same entry point serves a laptop, one GPU host and a TPU pod.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _cluster_launcher_detected() -> bool:
    if (_env_int("SLURM_NTASKS") or 1) > 1:
        return True
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initializes multi-host JAX when needed; returns whether it did. Safe to call twice."""
    coordinator_address = coordinator_address or os.environ.get("EXPINT_COORDINATOR") or None
    num_processes = num_processes if num_processes is not None else _env_int("EXPINT_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("EXPINT_PROCESS_ID")
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit and not _cluster_launcher_detected():
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError(
                "multi-host start-up needs coordinator_address, num_processes and process_id together "
                "(or EXPINT_COORDINATOR, EXPINT_NUM_PROCESSES, EXPINT_PROCESS_ID)"
            )
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialized: process %d of %d", jax.process_index(), jax.process_count())
    return True
