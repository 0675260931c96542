"""The sandbox's child process: confines itself, then runs the untrusted code (see ``sandbox``).

Contract with the parent (``Sandbox._run_in``), which runs this file by path as
``python -I -B <this file> CONFIG`` (behind ``unshare`` where the machine allows it):

* **argv** -- ``sys.argv[1]`` is one JSON object: ``code_path`` (the file holding the code),
  ``scratch`` (the run's scratch directory, also its working directory), ``cgroup_procs`` (the
  ``cgroup.procs`` file of the run's pids cgroup, or null), ``memory_mib`` and ``max_file_mib``
  (for the messages only), ``pid_namespace`` (this process is PID 1 of a PID namespace of its
  own), ``readonly_root`` (this process is in a mount namespace of its own, to be made read-only
  but for the scratch directory), ``parent_mount_namespace`` (the parent's ``/proc/self/ns/mnt``,
  or null) and ``rlimits`` (``[name, soft, hard]`` triples for ``resource.setrlimit``).
* **stdin** is ``/dev/null``; **stdout/stderr** are files the parent reads after the run; the
  **environment** is the parent's clean one (``HOME`` and ``TMPDIR`` are the scratch directory).
* **What it writes** -- the code's own output, and the exit status: the code's own (``sys.exit``,
  1 after an uncaught exception, whose traceback goes to stderr without this module's frame), or
  ``EXIT_MEMORY`` / ``EXIT_FILE_SIZE`` with ``MEMORY_MARKER`` / ``FILE_SIZE_MARKER`` on stderr,
  or ``EXIT_SETUP`` with ``SETUP_MARKER`` on stderr when confinement failed and the code never
  ran. As PID 1 of a PID namespace, after the code's process was killed by a signal:
  ``EXIT_SIGNAL`` with ``signal_report(signum)`` as the last line of stderr (PID 1 ignores most
  signals, so it cannot die of the same one to say so).

Order: while still privileged it joins its cgroup, reads the code and, in a mount namespace of
its own, makes the file system read-only; in a PID namespace of its own (where it is PID 1) it
then forks and only reports how the child ended. The process that runs the code sets its limits,
installs the audit hook and runs it.

This module must stay standard-library only and cheap to start: it runs with ``-I`` in a fresh
interpreter (possibly not the parent's, ``Sandbox(python=...)``) where ``expint_jax`` need not be
importable. Importing it (the parent does, for the constants; tests do, for the helpers) has no
side effects.
"""

# No ``from __future__`` imports: ``compile()`` in ``_main`` would pass them on to the code.
import errno
import json
import linecache
import os
import re
import resource
import sys
import traceback
import urllib.parse

EXIT_SETUP = 70  # confinement could not be set up; the code never ran
EXIT_MEMORY = 86  # after a MemoryError
EXIT_FILE_SIZE = 87  # after a write failed with EFBIG (RLIMIT_FSIZE)
EXIT_SIGNAL = 88  # as PID 1 of the run's namespace, after the code's process was killed by a signal
MEMORY_MARKER = "sandbox: memory limit exceeded"
FILE_SIZE_MARKER = "sandbox: file size limit exceeded"
SETUP_MARKER = "sandbox setup failed:"
_PROC_ENTRY = re.compile(r"/proc/(?P<pid>[^/]+)(?:/|\Z)")


def signal_report(signum: int) -> str:
    """The line PID 1 writes to stderr when the code's process was killed by signal ``signum``."""
    return f"sandbox: the code was killed by signal {signum}\n"


def is_inside(full: str | None, scratch: str) -> bool:
    """Whether the resolved path ``full`` may be written: the scratch directory, below it, or ``/dev/null``.

    None stands for the working directory (inside) or an already-open descriptor.
    """
    return full is None or full in (scratch, "/dev/null") or full.startswith(scratch + os.sep)


def is_other_process(full: str | None, own_pid: str, proc_entry: re.Pattern = _PROC_ENTRY) -> bool:
    """Whether the resolved path is ``/proc/<pid>/...`` of a process other than ``own_pid``, or any environ file.

    (The parent's environ holds API keys.)
    """
    entry = proc_entry.match(full or "")
    return entry is not None and ((entry["pid"].isdigit() and entry["pid"] != own_pid)
                                  or full.endswith("/environ"))


def database_paths(database: str | bytes) -> list[str]:
    """The files ``sqlite3.connect(database)`` may open, under both readings of the name (plain path and URI).

    The audit event does not say whether connect() reads the name as a URI, so both are checked.
    """
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
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18  # noqa: N806
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
        os.write(2, signal_report(os.WTERMSIG(status)).encode())
        os._exit(EXIT_SIGNAL)
    os._exit(os.waitstatus_to_exitcode(status))


def _limit(config):
    for name, soft, hard in config["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _guard(scratch):
    import posix
    # The hook reaches its helpers through these closure cells, never through this module's
    # globals: the code can reach those (``import __main__``) and rebind them.
    contains, other_process, sqlite_paths = is_inside, is_other_process, database_paths
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    path_events = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
                   "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
                   "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,), "shutil.rmtree": (0,)}
    process_events = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                      "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill"}
    foreign_events = {"ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function"}
    introspection_events = {"gc.get_objects", "gc.get_referrers", "gc.get_referents"}  # could find this hook
    own_pid = str(os.getpid())

    def resolve(path):
        if path is None or isinstance(path, int):
            return None  # the working directory (inside) or an already-open descriptor
        path = os.fsdecode(path)
        return os.path.realpath(os.path.join(os.getcwd(), path))

    def inside(full):
        return contains(full, scratch)

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
            if other_process(full, own_pid):
                raise PermissionError(f"sandbox: reading other processes' /proc entries is not allowed ({path!r})")
            if full is not None and not inside(full) and os.path.isdir(full):
                raise PermissionError(
                    f"sandbox: opening directories outside the scratch directory is not allowed ({path!r})")
        elif event in ("os.listdir", "os.scandir"):
            if other_process(resolve(args[0]), own_pid):
                raise PermissionError(f"sandbox: reading other processes' /proc entries is not allowed ({args[0]!r})")
        elif event in path_events:
            for i in path_events[event]:
                if not inside(resolve(args[i])):
                    raise PermissionError(
                        f"sandbox: changing files outside the scratch directory is not allowed ({event} {args[i]!r})")
        elif event == "sqlite3.connect":
            for path in sqlite_paths(args[0]):
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
        sys.stderr.write(f"{SETUP_MARKER} {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        os._exit(EXIT_SETUP)
    _guard(os.path.realpath(config["scratch"]))
    sys.argv = ["<code>"]
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    status = 0
    try:
        exec(compile(code, "<code>", "exec"), namespace)
    except MemoryError:
        sys.stderr.write(f"MemoryError: {MEMORY_MARKER} ({config['memory_mib']} MiB)\n")
        status = EXIT_MEMORY
    except OSError as e:
        if e.errno != errno.EFBIG:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            status = 1
        else:
            sys.stderr.write(f"OSError: {FILE_SIZE_MARKER} ({config['max_file_mib']} MiB)\n")
            status = EXIT_FILE_SIZE
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


if __name__ == "__main__":
    _main()
