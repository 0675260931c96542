"""The ``expint`` command: ``expint <command> [options]``.

Each command lives in the module of its domain and exposes ``main(argv) -> int``; this file only
dispatches, importing a command's module when that command runs (so ``expint --help`` is fast
and a command's heavy imports never slow another).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "check-model": ("expint_jax.models.check", "load a Qwen3 checkpoint onto a mesh and check parity with transformers"),
    "distill": ("expint_jax.distill.run", "context-distill a Qwen3 toward its experience-conditioned self (CPU demo by default)"),
    "granularity": ("expint_jax.experience.granularity", "share of URLs, numbers, entities and strategy statements in a pool"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: expint <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run 'expint <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"expint: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
