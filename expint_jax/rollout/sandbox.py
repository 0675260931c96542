"""Runs untrusted Python in a separate, confined process; ``PythonTool`` exposes it to the agent.

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
from collections.abc import Mapping
from typing import Any

from expint_jax.rollout.tools import ToolError, ToolSpec, require_str

log = logging.getLogger(__name__)

KILLED_REASONS = ("wall_time", "cpu_time", "memory", "file_size", "signal")
_EXIT_MEMORY = 86  # the bootstrap's exit status after a MemoryError
_EXIT_FILE_SIZE = 87  # ... after a write failed with EFBIG (RLIMIT_FSIZE)
_EXIT_SETUP = 70  # the bootstrap could not confine itself; the code never ran
_EXIT_SIGNAL = 88  # ... as PID 1 of the run's namespace, after the code's process was killed by a signal
_MEMORY_MARKER = "sandbox: memory limit exceeded"
_FILE_SIZE_MARKER = "sandbox: file size limit exceeded"
_SETUP_MARKER = "sandbox setup failed:"
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
        command = unshare_prefix(self.isolation) + [self.python, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(config)]
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


# The child's entry point (run with ``python -I -B -c``). While still privileged it joins its
# cgroup, reads the code and, in a mount namespace of its own, makes the file system read-only;
# in a PID namespace of its own (where it is PID 1) it then forks and only reports how the child
# ended. The process that runs the code sets its limits, installs the audit hook and runs it.
_BOOTSTRAP = r'''
import errno, json, linecache, os, re, resource, sys, traceback

def _setup(config):
    if config["cgroup_procs"] is not None:  # first, so that everything this process starts is counted
        with open(config["cgroup_procs"], "w") as f:
            f.write(str(os.getpid()))
    with open(config["code_path"], encoding="utf-8") as f:
        code = f.read()
    if config["readonly_root"]:
        _read_only_file_system(os.path.realpath(config["scratch"]), config["parent_mount_namespace"])
    return code

def _read_only_file_system(scratch, parent_namespace):
    import ctypes
    # Only bind remounts (per-mount flags, never a file system's own) and only in a namespace that
    # is certainly not the parent's: nothing here can make the host's files read-only.
    if os.readlink("/proc/self/ns/mnt") == parent_namespace:
        raise RuntimeError("not in a mount namespace of its own; refusing to remount")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
    # Flags a remount must repeat: a user namespace may not clear them.
    kept = {os.ST_NOSUID: 2, os.ST_NODEV: 4, os.ST_NOEXEC: 8, os.ST_NOATIME: 1024, os.ST_NODIRATIME: 2048,
            os.ST_RELATIME: 1 << 21}

    def mount(source, target, flags):
        if libc.mount(source and os.fsencode(source), os.fsencode(target), None, flags, None) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"mount {target!r}: {os.strerror(error)}")

    mount(None, "/", MS_REC | MS_PRIVATE)  # no mount event may propagate to the parent's namespace
    mount(scratch, scratch, MS_BIND)  # the scratch directory becomes a mount of its own, left writable
    os.chdir(scratch)  # the working directory still pointed into the mount underneath
    with open("/proc/self/mountinfo") as f:
        targets = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in f]
    for target in dict.fromkeys(targets):
        flags = os.statvfs(target).f_flag
        if target != scratch and not flags & os.ST_RDONLY:
            locked = sum(bit for st, bit in kept.items() if flags & st)
            mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | locked)

def _init(child):
    # PID 1 of the run's PID namespace: reap every process until the code's own ends, then report
    # how it ended (our own death by a signal could not say it: PID 1 ignores most signals).
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        os.write(2, f"sandbox: the code was killed by signal {os.WTERMSIG(status)}\n".encode())
        os._exit(88)
    os._exit(os.waitstatus_to_exitcode(status))

def _limit(config):
    for name, soft, hard in config["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))

def _guard(scratch):
    import posix, urllib.parse
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    path_events = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
                   "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
                   "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,), "shutil.rmtree": (0,)}
    process_events = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                      "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill"}
    foreign_events = {"ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function"}
    introspection_events = {"gc.get_objects", "gc.get_referrers", "gc.get_referents"}  # could find this hook
    allowed = (scratch, "/dev/null")
    own_pid = str(os.getpid())
    proc_entry = re.compile(r"/proc/(?P<pid>[^/]+)(?:/|\Z)")

    def resolve(path):
        if path is None or isinstance(path, int):
            return None  # the working directory (inside) or an already-open descriptor
        path = os.fsdecode(path)
        return os.path.realpath(os.path.join(os.getcwd(), path))

    def inside(full):
        return full is None or full in allowed or full.startswith(scratch + os.sep)

    def other_process(full):
        # /proc/<pid>/... of any other process (the parent's environ holds API keys), any environ file
        entry = proc_entry.match(full or "")
        return entry is not None and ((entry["pid"].isdigit() and entry["pid"] != own_pid)
                                      or full.endswith("/environ"))

    def database_paths(database):
        # The event does not say whether connect() reads the name as a URI, so check both readings.
        name = os.fsdecode(database)
        if name in ("", ":memory:"):
            return []
        paths = [name]
        if name.startswith("file:"):
            body, _, query = name[5:].partition("?")
            if "mode=memory" in query:
                return []
            if body.startswith("//"):  # file://host/path
                body = "/" + body[2:].partition("/")[2]
            body = urllib.parse.unquote(body.partition("#")[0])
            if body not in ("", ":memory:"):
                paths.append(body)
        return paths

    def refuse_outside(what, path):
        if not inside(resolve(path)):
            raise PermissionError(f"sandbox: writing outside the scratch directory is not allowed ({what} {path!r})")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            full = resolve(path)
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing and not inside(full):
                raise PermissionError(f"sandbox: writing outside the scratch directory is not allowed ({path!r})")
            if other_process(full):
                raise PermissionError(f"sandbox: reading other processes' /proc entries is not allowed ({path!r})")
            if full is not None and not inside(full) and os.path.isdir(full):
                raise PermissionError(
                    f"sandbox: opening directories outside the scratch directory is not allowed ({path!r})")
        elif event in ("os.listdir", "os.scandir"):
            if other_process(resolve(args[0])):
                raise PermissionError(f"sandbox: reading other processes' /proc entries is not allowed ({args[0]!r})")
        elif event in path_events:
            for i in path_events[event]:
                if not inside(resolve(args[i])):
                    raise PermissionError(
                        f"sandbox: changing files outside the scratch directory is not allowed ({event} {args[i]!r})")
        elif event == "sqlite3.connect":
            for path in database_paths(args[0]):
                refuse_outside(event, path)
        elif event.startswith("socket."):
            raise PermissionError("sandbox: network access is disabled")
        elif event in process_events:
            raise PermissionError(f"sandbox: starting or signalling processes is not allowed ({event})")
        elif event in foreign_events or (event == "ctypes.dlopen" and args[0] is not None):
            raise PermissionError(f"sandbox: loading foreign code is not allowed ({event})")
        elif event.startswith("resource.set") or event == "resource.prlimit":
            raise PermissionError("sandbox: changing resource limits is not allowed")
        elif event in introspection_events or (event == "object.__setattr__" and args[1] == "__code__"):
            raise PermissionError(f"sandbox: reaching into the interpreter is not allowed ({event})")

    def special_file(name, create):
        # os.mkfifo and os.mknod raise no audit event; the read-only root is the backstop behind this.
        def guarded(path, *args, dir_fd=None, **kwargs):
            if dir_fd is not None:
                raise PermissionError(f"sandbox: os.{name} with dir_fd is not allowed")
            refuse_outside(f"os.{name}", path)
            return create(path, *args, **kwargs)
        return guarded

    for name in ("mkfifo", "mknod"):
        if hasattr(os, name):
            guarded = special_file(name, getattr(os, name))
            setattr(os, name, guarded)
            setattr(posix, name, guarded)
    sys.addaudithook(hook)

def _main():
    config = json.loads(sys.argv[1])
    try:
        code = _setup(config)
        if config["pid_namespace"]:
            child = os.fork()
            if child:
                _init(child)
        _limit(config)
    except Exception as e:
        sys.stderr.write(f"sandbox setup failed: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        os._exit(70)
    _guard(os.path.realpath(config["scratch"]))
    sys.argv = ["<code>"]
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    status = 0
    try:
        exec(compile(code, "<code>", "exec"), namespace)
    except MemoryError:
        sys.stderr.write(f"MemoryError: sandbox: memory limit exceeded ({config['memory_mib']} MiB)\n")
        status = 86
    except OSError as e:
        if e.errno != errno.EFBIG:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            status = 1
        else:
            sys.stderr.write(f"OSError: sandbox: file size limit exceeded ({config['max_file_mib']} MiB)\n")
            status = 87
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            sys.stderr.write(f"{e.code}\n")
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # the stream itself hit the file size limit
            pass
    os._exit(status)

_main()
'''


# ---------------------------------------------------------------------------------------------
# The agent's tool
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*```(?:python|py)?\s*\n(?P<body>.*?)\n?```\s*$", re.S | re.I)


def observation(result: SandboxResult, limits: SandboxLimits) -> str:
    """What the agent sees: output, errors and, when something stopped the code, why."""
    parts = []
    if result.stdout.strip():
        parts.append(result.stdout.rstrip())
    if result.stderr.strip():
        parts.append(f"[stderr]\n{result.stderr.rstrip()}")
    reason = {
        "wall_time": f"Execution stopped: the code ran longer than the time limit of {limits.wall_time_s:g} s.",
        "cpu_time": f"Execution stopped: the code used more than {limits.cpu_time_s} s of CPU time.",
        "memory": f"Execution stopped: the code tried to use more than {limits.memory_bytes >> 20} MiB of memory.",
        "file_size": (f"Execution stopped: the code wrote more than {limits.max_file_bytes >> 20} MiB of output "
                      "or files."),
        "signal": "Execution stopped: the process was killed by a signal.",
    }.get(result.killed_reason or "")
    if reason:
        parts.append(reason)
    elif result.exit_status not in (0, None):
        parts.append(f"The code exited with status {result.exit_status}.")
    if not parts:
        return "The code ran without errors and printed nothing. Use print() to show values."
    return "\n".join(parts)


class PythonTool:
    """The ``python`` tool: runs the given code in a fresh sandbox and returns what it printed.

    Failures (an exception, a refused operation, a limit) raise ``ToolError`` whose message is the
    full observation, so the agent sees the traceback or the limit that stopped the code.
    """

    def __init__(self, sandbox: Sandbox | None = None):
        self.sandbox = sandbox or Sandbox()
        limits = self.sandbox.limits
        self.spec = ToolSpec("python", (
            "Run Python 3 code in a fresh, isolated process and return what it prints (use print()). "
            f"No network, no subprocesses; limits: {limits.wall_time_s:g} s, "
            f"{limits.memory_bytes >> 20} MiB of memory; the standard library"
            f"{' and numpy' if _has_numpy(self.sandbox.python) else ''} are available. State is not kept "
            "between calls."
        ), {"type": "object", "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"]})

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        code = require_str(arguments, "code", "python")
        fenced = _FENCE.match(code)
        if fenced:
            code = fenced.group("body")
        result = self.sandbox.run(code)
        text = observation(result, self.sandbox.limits)
        if not result.ok:
            raise ToolError(text)
        return text


@functools.cache
def _has_numpy(python: str) -> bool:
    if python == sys.executable:
        import importlib.util

        return importlib.util.find_spec("numpy") is not None
    probe = subprocess.run([python, "-I", "-c", "import numpy"], capture_output=True, timeout=60)
    return probe.returncode == 0
