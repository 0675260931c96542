"""Test helper: start N Python processes joined by ``jax.distributed`` on localhost.

``run_processes(argv, count, devices)`` starts ``count`` copies of ``python <argv>`` from the
repository root with ``EXPINT_COORDINATOR`` (a free localhost port), ``EXPINT_NUM_PROCESSES`` and
``EXPINT_PROCESS_ID`` set (``parallel.distributed.initialize`` reads them) and ``devices`` fake CPU
devices each, waits for all, and returns their ``CompletedProcess``es (text output) in process
order. ``single_env(devices)`` is the environment of one process with ``devices`` fake devices.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def single_env(devices: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This test session's environment for one JAX process with ``devices`` fake CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    env = {**os.environ, "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    for name in ("EXPINT_COORDINATOR", "EXPINT_NUM_PROCESSES", "EXPINT_PROCESS_ID"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def run_processes(argv: Sequence[str], count: int, devices: int, *, extra_env: Mapping[str, str] | None = None,
                  timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Runs ``count`` processes of ``python <argv>`` as one multi-controller JAX program; see the module docstring."""
    coordinator = f"localhost:{free_port()}"
    processes = []
    for index in range(count):
        env = single_env(devices, {**(extra_env or {}), "EXPINT_COORDINATOR": coordinator,
                                   "EXPINT_NUM_PROCESSES": str(count), "EXPINT_PROCESS_ID": str(index)})
        processes.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for index, process in enumerate(processes):
            stdout, stderr = process.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return done
