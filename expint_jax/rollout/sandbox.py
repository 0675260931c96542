"""Runs untrusted Python in a separate, confined process (``python_tool.PythonTool`` exposes it to the agent).

Every run gets a fresh process and a fresh scratch directory (its working directory, ``HOME`` and
``TMPDIR``), a clean environment (no API keys are inherited) and these layers of confinement:

* **time** -- ``RLIMIT_CPU`` (CPU seconds) and a wall-clock timeout; on timeout the whole process
  group is killed;
* **memory** -- ``RLIMIT_AS`` (address space), so a large allocation fails with ``MemoryError``;
* **output and files** -- ``RLIMIT_FSIZE`` caps every file the process writes (its captured
  stdout/stderr included); what is returned is cut to ``max_output_chars`` with a marker;
* **network** -- a fresh network namespace with no interfaces (``unshare --net``) when the machine
  allows it, and always an audit hook in the child that refuses socket creation and use;
* **processes** -- the audit hook refuses ``fork``/``exec``/``spawn``/``subprocess``/``os.system``
  and loading foreign code (``ctypes``); and, where the parent may create one (root, a writable
  ``pids`` cgroup controller), each run gets its own cgroup whose ``pids.max`` caps its processes
  and threads -- the backstop for what the hook cannot see (``_posixsubprocess.fork_exec`` raises
  no audit event). After the run every process of the run is killed: the process group, and every
  member of the cgroup, even ones that started a new session. (``RLIMIT_NPROC`` would not help:
  it counts per user, and root is exempt);
* **files** -- the audit hook refuses opening files for writing, and removing, renaming, linking
  or changing files, outside the scratch directory (paths are resolved, so ``..`` and symlinks do
  not escape), opening directories outside it and opening SQLite databases outside it
  (``sqlite3.connect``); ``os.mkfifo``/``os.mknod``, which raise no audit event, are replaced
  before the code runs by versions that refuse paths outside it. Python-level guards can be
  bypassed by code that works hard enough (a fresh ``posix`` module, SQLite's ``ATTACH``, a C
  extension), so where a mount namespace is available (``unshare --mount``) the whole file
  system is remounted read-only in the run's namespace except the scratch directory: the kernel
  backstop for every write the hook cannot see. The code runs as the parent's user, so file
  permissions add nothing when that user is root: run the parent unprivileged where it matters;
* **other processes** -- the code must not read the parent's environment (API keys) or anything
  else about other processes: the audit hook refuses ``/proc/<pid>/...`` of any process but the
  code's own and every ``environ`` file under ``/proc``; and where the machine allows it, the run
  gets its own PID namespace with a fresh ``/proc`` (``unshare --pid --fork --mount-proc``), so
  no other process of the machine is even visible. In that namespace a small init (the
  bootstrap, PID 1) runs the code in a child, because PID 1 ignores signals such as ``SIGXCPU``
  that must stop the code, and reports how the child ended; when the init ends, the kernel kills
  whatever is left in the namespace. The parent is deliberately *not* made non-dumpable
  (``PR_SET_DUMPABLE``): a root child could read it anyway (``CAP_SYS_PTRACE``), and it would
  turn off core dumps and debuggers for the whole host process.

``Sandbox.run(code) -> SandboxResult`` never raises for anything the code does; ``SandboxError``
is for a sandbox that cannot start at all. ``killed_reason`` says which limit stopped the code
(one of ``KILLED_REASONS``: killed by the wall clock or ``RLIMIT_CPU``, a ``MemoryError``, a write
refused by ``RLIMIT_FSIZE``, or another signal), or is None when the code ended on its own.
Refusals by the audit hook are ``PermissionError``s raised inside the code: the traceback on
stderr names them ("sandbox: network access is disabled").

This module is the parent side; the child process (the bootstrap that confines itself and runs
the code, PID 1 of the run's PID namespace) is ``sandbox_child``, whose docstring states the
contract between the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from expint_jax.rollout import sandbox_child

log = logging.getLogger(__name__)

KILLED_REASONS = ("wall_time", "cpu_time", "memory", "file_size", "signal")
# The child's exit statuses and stderr markers (see ``sandbox_child``).
_EXIT_MEMORY, _MEMORY_MARKER = sandbox_child.EXIT_MEMORY, sandbox_child.MEMORY_MARKER
_EXIT_FILE_SIZE, _FILE_SIZE_MARKER = sandbox_child.EXIT_FILE_SIZE, sandbox_child.FILE_SIZE_MARKER
_EXIT_SETUP, _SETUP_MARKER = sandbox_child.EXIT_SETUP, sandbox_child.SETUP_MARKER
_EXIT_SIGNAL = sandbox_child.EXIT_SIGNAL
# Run by file path, not ``-m expint_jax.rollout.sandbox_child``: under ``-I`` (no PYTHONPATH, no
# working directory on sys.path) ``-m`` finds the module only where ``expint_jax`` is installed in
# the interpreter that runs the code, which ``Sandbox(python=...)`` need not be; and ``-m`` would
# import the package ``__init__``s (``expint_jax``, ``expint_jax.rollout``, ``exports``) into every run.
_CHILD_PATH = os.path.abspath(sandbox_child.__file__)
_SIGNAL_LINE = re.compile(r"sandbox: the code was killed by signal (\d+)\n\Z")
_PID_NAMESPACE_FLAGS = ("--pid", "--fork", "--mount-proc")
_CGROUP_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")  # cgroup v1 pids controller, cgroup v2


class SandboxError(RuntimeError):
    """The sandbox itself could not run (missing interpreter, confinement could not be set up)."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    wall_time_s: float = 10.0
    cpu_time_s: int = 10
    memory_bytes: int = 1 << 30
    max_processes: int = 64  # processes + threads; enforced where a pids cgroup is available
    max_file_bytes: int = 16 << 20
    max_open_files: int = 256
    max_output_chars: int = 8_000  # per stream, in what is returned

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"SandboxLimits.{field.name} must be > 0, got {getattr(self, field.name)}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_status: int | None  # None when the process was killed by a signal
    timed_out: bool  # the wall-clock limit fired
    killed_reason: str | None  # the limit that stopped the code (KILLED_REASONS), or None
    pid: int  # also the process-group id of the run

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and self.killed_reason is None


@dataclasses.dataclass(frozen=True)
class Isolation:
    """Which optional confinement layers this machine supports."""

    network_namespace: bool
    pids_cgroup_root: str | None  # where per-run pids cgroups can be created, if anywhere
    pid_namespace: bool = False  # a PID namespace of its own with a fresh /proc
    readonly_root: bool = False  # a mount namespace whose file system is read-only but for the scratch


def unshare_prefix(isolation: Isolation) -> list[str]:
    """The ``unshare`` command line that puts a run into the namespaces ``isolation`` names."""
    flags = (["--net"] if isolation.network_namespace else []) + (
        list(_PID_NAMESPACE_FLAGS) if isolation.pid_namespace else ["--mount"] if isolation.readonly_root else [])
    return _unshare(flags) if flags else []


def _unshare(flags: list[str]) -> list[str]:
    # Without root, a user namespace (mapping us to its root) is what lets us create the others.
    return ["unshare", *flags, *([] if os.geteuid() == 0 else ["--map-root-user"])]


@functools.cache
def probe_isolation() -> Isolation:
    """Checks once per process which namespaces ``unshare`` can create and where a pids cgroup can be made.

    The read-only root is checked by a trial run, since remounting can fail where creating the
    namespace works; a machine without it keeps the other layers (the reason is logged).
    """
    cgroup = _find_pids_cgroup_root() if os.geteuid() == 0 else None
    if not shutil.which("unshare"):
        return Isolation(network_namespace=False, pids_cgroup_root=cgroup)

    def works(*flags: str) -> bool:
        command = [*_unshare(list(flags)), "true"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(command, capture_output=True, timeout=10).returncode == 0
        return False

    isolation = Isolation(network_namespace=works("--net"), pids_cgroup_root=cgroup,
                          pid_namespace=works(*_PID_NAMESPACE_FLAGS))
    if works("--mount"):
        trial = dataclasses.replace(isolation, readonly_root=True, pids_cgroup_root=None)
        try:
            result = Sandbox(SandboxLimits(wall_time_s=30.0), isolation=trial).run("open('probe', 'w').write('ok')")
            if result.ok:
                return dataclasses.replace(isolation, readonly_root=True)
            reason = result.stderr.strip()[-300:]
        except SandboxError as e:
            reason = str(e)
        log.warning("sandbox: the file system cannot be made read-only here (%s); relying on the audit hook", reason)
    return isolation


def _find_pids_cgroup_root() -> str | None:
    for root in _CGROUP_ROOTS:
        probe = os.path.join(root, f"expint-sandbox-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        usable = os.path.exists(os.path.join(probe, "pids.max"))
        with contextlib.suppress(OSError):
            os.rmdir(probe)
        if usable:
            return root
    return None


def truncate_middle(text: str, max_chars: int) -> str:
    """Keeps the head and the tail (where tracebacks end) with a marker saying how much was cut."""
    if len(text) <= max_chars:
        return text
    head = max_chars * 2 // 3
    tail = max_chars - head
    return f"{text[:head]}\n[... {len(text) - max_chars} characters cut ...]\n{text[len(text) - tail:]}"


class _RunCgroup:
    """A pids cgroup holding one run: caps its process count and finds every process to kill."""

    _counter = itertools.count()

    def __init__(self, root: str, max_processes: int):
        self.path = os.path.join(root, f"expint-sandbox-{os.getpid()}-{next(self._counter)}")
        os.mkdir(self.path)
        with open(os.path.join(self.path, "pids.max"), "w") as f:
            f.write(str(max_processes))

    def members(self) -> list[int]:
        with contextlib.suppress(OSError), open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
        return []

    def kill_all(self) -> None:
        for _ in range(200):  # a fork may land between reading and killing; pids.max bounds the churn
            members = self.members()
            if not members:
                return
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        log.warning("sandbox cgroup %s still has processes after repeated SIGKILL", self.path)

    def remove(self) -> None:
        for _ in range(100):  # killed processes leave the cgroup once their parent reaps them
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
        log.warning("could not remove sandbox cgroup %s", self.path)


class Sandbox:
    """Runs code under ``limits``; see the module docstring."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), *, python: str = sys.executable,
                 isolation: Isolation | None = None):
        if not python or not os.access(python, os.X_OK):
            raise SandboxError(f"Sandbox: no executable Python interpreter at {python!r}")
        self.limits = limits
        self.python = python
        self.isolation = isolation or probe_isolation()

    def run(self, code: str) -> SandboxResult:
        if not isinstance(code, str):
            raise TypeError(f"Sandbox.run: code must be str, got {type(code).__name__}")
        root = self.isolation.pids_cgroup_root
        try:
            cgroup = _RunCgroup(root, self.limits.max_processes) if root else None
        except OSError as e:
            raise SandboxError(f"Sandbox: could not create a pids cgroup under {root}: {e}") from None
        try:
            with tempfile.TemporaryDirectory(prefix="expint-sandbox-") as work:
                return self._run_in(work, code, cgroup)
        finally:
            if cgroup is not None:
                cgroup.remove()

    def _run_in(self, work: str, code: str, cgroup: _RunCgroup | None) -> SandboxResult:
        limits = self.limits
        scratch = os.path.join(work, "scratch")
        os.mkdir(scratch, 0o700)
        code_path = os.path.join(work, "code.py")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        config = {
            "code_path": code_path,
            "scratch": scratch,
            "cgroup_procs": None if cgroup is None else os.path.join(cgroup.path, "cgroup.procs"),
            "memory_mib": limits.memory_bytes >> 20,
            "max_file_mib": limits.max_file_bytes >> 20,
            "pid_namespace": self.isolation.pid_namespace,
            "readonly_root": self.isolation.readonly_root,
            "parent_mount_namespace": os.readlink("/proc/self/ns/mnt") if self.isolation.readonly_root else None,
            "rlimits": [["RLIMIT_CPU", limits.cpu_time_s, limits.cpu_time_s + 1],
                        ["RLIMIT_AS", limits.memory_bytes, limits.memory_bytes],
                        ["RLIMIT_FSIZE", limits.max_file_bytes, limits.max_file_bytes],
                        ["RLIMIT_NOFILE", limits.max_open_files, limits.max_open_files],
                        ["RLIMIT_CORE", 0, 0]],
        }
        command = unshare_prefix(self.isolation) + [self.python, "-I", "-B", _CHILD_PATH, json.dumps(config)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        stdout_path, stderr_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=scratch,
                                           env=env, process_group=0, close_fds=True)
            except OSError as e:
                raise SandboxError(f"Sandbox: could not start {command[0]!r}: {e}") from None
            timed_out = False
            try:
                process.wait(timeout=limits.wall_time_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                if cgroup is not None:
                    cgroup.kill_all()
                process.wait()
                _wait_until_gone(process.pid)
        stdout, stderr = _read_text(stdout_path), _read_text(stderr_path)
        status = process.returncode
        if status == _EXIT_SIGNAL and (line := _SIGNAL_LINE.search(stderr)):  # reported by the namespace's init
            status, stderr = -int(line.group(1)), stderr[: line.start()]
        if status == _EXIT_SETUP and _SETUP_MARKER in stderr:
            raise SandboxError(f"Sandbox: confinement could not be set up: {stderr.strip()[-500:]}")
        return SandboxResult(
            stdout=truncate_middle(stdout, limits.max_output_chars),
            stderr=truncate_middle(stderr, limits.max_output_chars),
            exit_status=None if status < 0 else status,
            timed_out=timed_out,
            killed_reason=_killed_reason(status, timed_out, stderr),
            pid=process.pid,
        )


def _wait_until_gone(group: int, timeout_s: float = 5.0) -> None:
    """Waits for the killed processes of a run that are not our children to be gone.

    In a PID namespace, the killed init and the code's process are reaped by the machine's init
    (``unshare`` died first), a moment after ``wait`` returned for ``unshare`` itself.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.002)
    log.warning("sandbox: processes of group %d are still alive %.0f s after SIGKILL", group, timeout_s)


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _killed_reason(status: int, timed_out: bool, stderr: str) -> str | None:
    if timed_out:
        return "wall_time"
    if status == -signal.SIGXCPU:
        return "cpu_time"
    if status == -signal.SIGXFSZ or (status == _EXIT_FILE_SIZE and _FILE_SIZE_MARKER in stderr):
        return "file_size"
    if status == _EXIT_MEMORY and _MEMORY_MARKER in stderr:
        return "memory"
    if status < 0:
        return "signal"
    return None
