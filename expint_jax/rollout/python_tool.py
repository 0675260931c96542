"""The agent's ``python`` tool: runs the model's code in a fresh ``Sandbox`` and shows what it printed.

``observation(result, limits)`` is the text the agent sees for one run: its output, its errors and,
when a limit stopped the code, which one.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from expint_jax.rollout.sandbox import Sandbox, SandboxLimits, SandboxResult
from expint_jax.rollout.tools import ToolError, ToolSpec, require_str

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
