"""The Python sandbox: every escape attempt is stopped or refused and says so; normal code works."""

import glob
import importlib.util
import os
import time

import pytest

from expint_jax.rollout import sandbox_child
from expint_jax.rollout.python_tool import PythonTool, observation
from expint_jax.rollout.sandbox import (
    _SIGNAL_LINE,
    Isolation,
    Sandbox,
    SandboxLimits,
    probe_isolation,
    truncate_middle,
)
from expint_jax.rollout.tools import ToolError
from tests.fakes.processes import group_alive

LIMITS = SandboxLimits(wall_time_s=20.0, cpu_time_s=5, memory_bytes=1 << 30, max_output_chars=2000)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS)


@pytest.fixture(scope="module")
def hook_only():
    """No namespaces and no cgroup: what a machine without ``unshare`` gets, the audit hook alone."""
    return Sandbox(LIMITS, isolation=Isolation(network_namespace=False, pids_cgroup_root=None))


@pytest.fixture(params=["all_layers", "hook_only"])
def any_sandbox(request, sandbox, hook_only):
    return {"all_layers": sandbox, "hook_only": hook_only}[request.param]


def test_normal_code_prints_and_computes(sandbox):
    result = sandbox.run("import math\nprint(sum(range(10)), math.comb(5, 2))\nprint('done')")
    assert result.ok and result.stdout == "45 10\ndone\n" and result.stderr == ""
    assert result.killed_reason is None and not result.timed_out


@pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="numpy is not installed")
def test_numpy_works(sandbox):
    result = sandbox.run("import numpy as np\nprint(np.linalg.solve([[2.0, 0], [0, 4.0]], [2.0, 8.0]).tolist())")
    assert result.ok, result.stderr
    assert result.stdout.strip() == "[1.0, 2.0]"


def test_network_socket_is_refused(sandbox):
    result = sandbox.run("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))")
    assert result.exit_status == 1
    assert "PermissionError: sandbox: network access is disabled" in result.stderr
    assert "network access is disabled" in observation(result, LIMITS)


@pytest.mark.skipif(not probe_isolation().network_namespace, reason="unshare --net is not available here")
def test_network_namespace_has_only_loopback(sandbox):
    result = sandbox.run("print(sorted(line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]))")
    assert result.stdout.strip() == "['lo']"


def test_fork_bomb_is_refused_quickly_and_leaves_no_process(sandbox):
    started = time.monotonic()
    result = sandbox.run("import os\nwhile True:\n    os.fork()")
    assert time.monotonic() - started < 5
    assert "sandbox: starting or signalling processes is not allowed (os.fork)" in result.stderr
    assert not group_alive(result.pid)
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')"):
        assert "starting or signalling processes is not allowed" in sandbox.run(code).stderr


_SHELL_BOMB = b"b() { b | b & }; b"


def _shell_bombs() -> int:
    count = 0
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                count += _SHELL_BOMB in f.read()
        except OSError:
            continue
    return count


@pytest.mark.skipif(probe_isolation().pids_cgroup_root is None, reason="no writable pids cgroup here")
def test_fork_bomb_that_bypasses_the_audit_hook_is_capped_and_killed():
    # _posixsubprocess.fork_exec raises no audit event; the bomb also starts a new session, so
    # killing the process group alone would miss it. The pids cgroup caps and finds it.
    code = (
        "import os, time, _posixsubprocess\n"
        "r, w = os.pipe()\n"
        f"args = [b'/bin/sh', b'-c', {_SHELL_BOMB!r}]\n"
        "_posixsubprocess.fork_exec(args, [args[0]], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w,"
        " False, True, -1, None, None, None, -1, None, False)\n"
        "time.sleep(60)\n"
    )
    limits = SandboxLimits(wall_time_s=1.5, cpu_time_s=5, max_processes=24)
    result = Sandbox(limits).run(code)
    assert result.timed_out and result.killed_reason == "wall_time"
    assert "Cannot fork" in result.stderr  # the cap was hit
    assert _shell_bombs() == 0
    root = probe_isolation().pids_cgroup_root
    assert not [d for d in os.listdir(root) if d.startswith(f"expint-sandbox-{os.getpid()}-")]


def test_ten_gigabyte_allocation_is_stopped(sandbox):
    result = sandbox.run("block = bytearray(10 * 1024 ** 3)\nprint('allocated')")
    assert result.killed_reason == "memory" and "allocated" not in result.stdout
    assert "more than 1024 MiB of memory" in observation(result, LIMITS)


def test_endless_loop_hits_the_cpu_limit():
    limits = SandboxLimits(wall_time_s=30.0, cpu_time_s=1)
    result = Sandbox(limits).run("while True:\n    pass")
    assert result.killed_reason == "cpu_time" and result.exit_status is None and not result.timed_out
    assert "more than 1 s of CPU time" in observation(result, limits)
    assert not group_alive(result.pid)


def test_sleeping_forever_hits_the_wall_clock_limit():
    limits = SandboxLimits(wall_time_s=0.5, cpu_time_s=5)
    started = time.monotonic()
    result = Sandbox(limits).run("import time\nprint('start', flush=True)\ntime.sleep(60)")
    assert time.monotonic() - started < 5
    assert result.timed_out and result.killed_reason == "wall_time" and result.stdout == "start\n"
    assert "time limit of 0.5 s" in observation(result, limits)
    assert not group_alive(result.pid)


def test_writes_outside_the_scratch_directory_are_refused(any_sandbox, tmp_path):
    sandbox = any_sandbox
    target = tmp_path / "outside.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        "open('../../escaped.txt', 'w')",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/outside.txt', 'w')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        # C-level writes that raise no "open" event: SQLite, FIFOs and device nodes
        f"import sqlite3\nsqlite3.connect({str(target)!r}).execute('create table t (x)')",
        f"import sqlite3\nsqlite3.connect('file:{target}?mode=rwc', uri=True)",
        f"import os\nos.mkfifo({str(target)!r})",
        f"import os, stat\nos.mknod({str(target)!r}, 0o600 | stat.S_IFIFO)",
        f"import posix\nposix.mkfifo({str(target)!r})",
        "import os\nos.symlink('/tmp', 'link')\nos.mkfifo('link/escaped-fifo')",
    ]
    for code in attempts:
        result = sandbox.run(code)
        assert "sandbox: writing outside the scratch directory is not allowed" in result.stderr, code
    assert not target.exists()
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    for code in (f"import os\nos.remove({str(keep)!r})", f"import os\nos.rename({str(keep)!r}, 'mine.txt')",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        assert "changing files outside the scratch directory is not allowed" in sandbox.run(code).stderr, code
    assert keep.read_text() == "keep"


def test_databases_and_fifos_inside_the_scratch_directory_work(any_sandbox):
    code = ("import os, sqlite3\n"
            "for name in ('mine.db', ':memory:', 'file:other.db?mode=rwc', 'file::memory:?mode=memory'):\n"
            "    db = sqlite3.connect(name, uri=name.startswith('file:'))\n"
            "    db.execute('create table t (x)'); db.execute('insert into t values (7)')\n"
            "    print(db.execute('select x from t').fetchone()[0])\n"
            "os.mkfifo('pipe')\nprint(*sorted(os.listdir('.')))")
    result = any_sandbox.run(code)
    assert result.ok, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == ["7"] * 4 and {"mine.db", "other.db", "pipe"} <= set(lines[4].split())


@pytest.mark.skipif(not probe_isolation().readonly_root, reason="no mount namespace with a read-only root here")
def test_read_only_root_stops_writes_the_audit_hook_cannot_see(sandbox, tmp_path):
    # A fresh posix module has the real mkfifo, and SQLite's ATTACH opens files in C: both get
    # past the Python-level guards, and the kernel refuses them.
    target = tmp_path / "outside"
    fresh_posix = f"import sys\ndel sys.modules['posix']\nimport posix\nposix.mkfifo({str(target)!r})"
    result = sandbox.run(fresh_posix)
    assert "Read-only file system" in result.stderr and not target.exists()
    attach = (f"import sqlite3\ndb = sqlite3.connect(':memory:')\n"
              f"db.execute(\"ATTACH '{target}' AS a\")\ndb.execute('create table a.t (x)')")
    result = sandbox.run(attach)
    assert "unable to open database" in result.stderr and not target.exists()
    assert sandbox.run("import tempfile\nwith tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')").ok


def test_scratch_directory_is_fresh_writable_and_removed(sandbox):
    first = sandbox.run("import os\nopen('note.txt', 'w').write('hi')\nprint(os.getcwd())\n"
                        "print(open('note.txt').read())")
    scratch, content = first.stdout.split()
    assert first.ok and content == "hi"
    assert not os.path.exists(scratch)
    second = sandbox.run("import os\nprint(os.listdir('.'))")
    assert second.stdout.strip() == "[]"


def test_secrets_in_the_parent_environment_do_not_reach_the_code(any_sandbox, monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "do-not-leak-123")
    result = any_sandbox.run("import os\nprint(os.environ.get('SERPER_API_KEY'))\nprint(sorted(os.environ))")
    assert result.stdout.splitlines()[0] == "None" and "do-not-leak-123" not in result.stdout
    # ... nor through /proc: the parent's environ (the environment it started with), its command
    # line, every other process's environ, and the same files reached through symlinks.
    attempts = {
        "parent": "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
        "pytest": f"print(open('/proc/{os.getpid()}/environ', 'rb').read())",
        "cmdline": f"print(open('/proc/{os.getpid()}/cmdline', 'rb').read())",
        "task": f"print(open('/proc/{os.getpid()}/task/{os.getpid()}/environ', 'rb').read())",
        "symlink": f"import os\nos.symlink('/proc/{os.getpid()}', 'p')\nprint(open('p/environ').read())",
        "listing": f"import os\nprint(os.listdir('/proc/{os.getpid()}/fd'))",
        "all": "import glob\nfor path in glob.glob('/proc/[0-9]*/environ'):\n"
               "    try:\n        print(open(path, 'rb').read())\n    except OSError as e:\n        print(e)",
    }
    for name, code in attempts.items():
        result = any_sandbox.run(code)
        output = result.stdout + result.stderr
        assert "do-not-leak-123" not in output and "SERPER_API_KEY" not in output, name
        if name != "all":
            assert "sandbox: reading other processes' /proc entries is not allowed" in result.stderr, name


@pytest.mark.skipif(not probe_isolation().pid_namespace, reason="unshare --pid is not available here")
def test_code_runs_in_a_pid_namespace_of_its_own(sandbox):
    result = sandbox.run("import os\nprint(os.getppid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert result.ok and result.stdout.strip() == "1 [1, 2]"  # the bootstrap's init and the code; nobody else


def test_long_output_is_cut_with_a_marker(sandbox):
    result = sandbox.run("print('a' * 50000)\nprint('THE END')")
    assert result.ok
    assert len(result.stdout) < LIMITS.max_output_chars + 100
    assert "characters cut ...]" in result.stdout and result.stdout.rstrip().endswith("THE END")
    assert truncate_middle("x" * 10, 20) == "x" * 10


def test_exit_status_and_exceptions_are_reported(sandbox):
    assert sandbox.run("import sys\nsys.exit(3)").exit_status == 3
    result = sandbox.run("x = 1\ny = x / 0")
    assert result.exit_status == 1
    assert 'File "<code>", line 2' in result.stderr and "ZeroDivisionError" in result.stderr
    assert "The code exited with status 1." in observation(result, LIMITS)


def test_python_tool_observations(sandbox):
    tool = PythonTool(sandbox)
    assert tool.spec.name == "python" and tool.spec.parameters["required"] == ["code"]
    assert tool({"code": "print(6 * 7)"}) == "42"
    assert tool({"code": "```python\nprint('fenced')\n```"}) == "fenced"
    assert "printed nothing" in tool({"code": "x = 1"})
    with pytest.raises(ToolError, match="ZeroDivisionError"):
        tool({"code": "1 / 0"})
    with pytest.raises(ToolError, match="network access is disabled"):
        tool({"code": "import socket\nsocket.socket()"})
    with pytest.raises(ToolError, match="'code' must be a non-empty string"):
        tool({"source": "print(1)"})


def test_limits_are_validated():
    with pytest.raises(ValueError, match="wall_time_s"):
        SandboxLimits(wall_time_s=0)
    with pytest.raises(TypeError, match="code must be str"):
        Sandbox(LIMITS).run(b"print(1)")


def test_child_path_containment_check():
    scratch = "/tmp/expint-sandbox-x/scratch"
    for inside in (None, scratch, scratch + "/a.txt", scratch + "/sub/b", "/dev/null"):
        assert sandbox_child.is_inside(inside, scratch), inside
    for outside in ("/tmp/expint-sandbox-x", scratch + "-evil/a", "/tmp/expint-sandbox-x/scratchy", "/etc/passwd",
                    "/dev/nullx", "/"):
        assert not sandbox_child.is_inside(outside, scratch), outside


def test_child_proc_and_sqlite_checks():
    assert sandbox_child.is_other_process("/proc/1/environ", "42")
    assert sandbox_child.is_other_process("/proc/7", "42")
    assert sandbox_child.is_other_process("/proc/self/environ", "42")  # any environ file
    assert sandbox_child.is_other_process("/proc/42/task/42/environ", "42")
    assert not sandbox_child.is_other_process("/proc/42/status", "42")
    assert not sandbox_child.is_other_process("/proc/self/status", "42")
    assert not sandbox_child.is_other_process("/proc/cpuinfo", "42")
    assert not sandbox_child.is_other_process(None, "42")
    assert sandbox_child.database_paths(":memory:") == [] and sandbox_child.database_paths(b"") == []
    assert sandbox_child.database_paths("file:x?mode=memory&cache=shared") == []
    assert sandbox_child.database_paths("db.sqlite") == ["db.sqlite"]
    assert sandbox_child.database_paths("file:/etc/a%20b.db?mode=ro#frag") == ["file:/etc/a%20b.db?mode=ro#frag",
                                                                               "/etc/a b.db"]
    assert sandbox_child.database_paths("file://localhost/etc/x.db") == ["file://localhost/etc/x.db", "/etc/x.db"]


def test_child_signal_report_is_what_the_parent_parses():
    stderr = "partial output\n" + sandbox_child.signal_report(9)
    line = _SIGNAL_LINE.search(stderr)
    assert line is not None and int(line.group(1)) == 9 and stderr[: line.start()] == "partial output\n"
    assert sandbox_child.EXIT_SIGNAL not in (0, 1, sandbox_child.EXIT_MEMORY, sandbox_child.EXIT_FILE_SIZE,
                                              sandbox_child.EXIT_SETUP)
