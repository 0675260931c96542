"""One process of ``tests/loop/test_multihost.py``: ``expint run ARGS...``, recording every
file-system write it makes under the runs directory.

    python -m tests.loop.multihost_worker WRITES_DIR RUNS_DIR ARGS...

Writes are seen through Python's audit events (``open`` for writing, rename/replace, mkdir,
remove, rmdir, rmtree, truncate, link, chmod, utime); they are saved as JSON to
``WRITES_DIR/process_<EXPINT_PROCESS_ID or 0>.json`` when the command returns, with its exit status.
Native writers that bypass Python (tensorstore, under orbax) are not seen.
"""

import json
import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.link",
           "os.symlink", "os.chmod", "os.utime", "shutil.copyfile", "shutil.move"}


def record_writes(root: str, log: list) -> None:
    root = os.path.abspath(root)

    def under(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        full = os.path.abspath(os.fsdecode(path))
        return full == root or full.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _mode, flags = args
            if isinstance(flags, int) and flags & _WRITE_FLAGS and under(path):
                log.append(["open", os.fsdecode(path)])
        elif event in _EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if any(under(p) for p in paths):
                log.append([event, *(os.fsdecode(p) for p in paths)])

    sys.addaudithook(hook)


def main() -> int:
    writes_dir, runs_dir, *args = sys.argv[1:]
    log: list = []
    record_writes(runs_dir, log)
    from expint_jax.cli import main as expint

    status = expint(["run", *args, f"--config.runs_dir={runs_dir}"])
    name = f"process_{os.environ.get('EXPINT_PROCESS_ID', '0')}.json"
    with open(os.path.join(writes_dir, name), "w") as f:
        json.dump({"status": status, "writes": log}, f)
    return status


if __name__ == "__main__":
    sys.exit(main())
