"""The ``expint`` command: ``expint <command> [options]``.

Each command is a module of this package (or, for ``distill``, of its domain) exposing
``main(argv) -> int``; the domain modules they call stay free of argument parsing. This file only
dispatches, importing a command's module when that command runs (so ``expint --help`` is fast
and a command's heavy imports never slow another).

Multi-host start-up happens here, once, before a command that uses devices runs:
``expint_jax.parallel.distributed.initialize`` calls ``jax.distributed.initialize`` when the
environment says several processes take part (``EXPINT_COORDINATOR``/``EXPINT_NUM_PROCESSES``/
``EXPINT_PROCESS_ID`` or a cluster launcher JAX knows) and is a no-op for a single process. It
must precede any JAX computation, which is why commands do not call it themselves.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys


@dataclasses.dataclass(frozen=True)
class Command:
    module: str
    summary: str
    uses_devices: bool = True  # start multi-host JAX before running it


COMMANDS: dict[str, Command] = {
    "check-model": Command("expint_jax.cli.check_model", "load a Qwen3 checkpoint onto a mesh and check parity with transformers"),
    "distill": Command("expint_jax.distill.run", "context-distill a Qwen3 toward its experience-conditioned self (CPU demo by default)"),
    "run": Command("expint_jax.cli.run", "run the self-evolution loop: rollouts, extraction, distillation, evaluation, report"),
    "granularity": Command("expint_jax.cli.granularity", "share of URLs, numbers, entities and strategy statements in a pool",
                           uses_devices=False),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: expint <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "Run 'expint <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"expint: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    if command.uses_devices and not any(arg in ("-h", "--help") for arg in rest):
        from expint_jax.parallel import distributed  # imports jax: only for commands that need it

        distributed.initialize()
    module = importlib.import_module(command.module)
    return int(module.main(rest) or 0)

