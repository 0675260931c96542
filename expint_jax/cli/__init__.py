"""The ``expint`` command: ``expint <command> [options]``.

Each command is a function ``(argv) -> int`` of a module of this package (``Command.function``,
``main`` by default); the domain modules they call stay free of argument parsing. This file only
dispatches, importing a command's module when that command runs (so ``expint --help`` is fast
and a command's heavy imports never slow another).

Multi-host start-up happens here, once, before a command that uses devices runs:
``expint_jax.parallel.distributed.initialize`` calls ``jax.distributed.initialize`` when the
environment says several processes take part (``EXPINT_COORDINATOR``/``EXPINT_NUM_PROCESSES``/
``EXPINT_PROCESS_ID`` or a cluster launcher JAX knows) and is a no-op for a single process. It
must precede any JAX computation, which is why commands do not call it themselves.

What every command shares, set up here: an expected user error is one line
``expint <command>: ...`` and exit status 2, a bug keeps its traceback, and ``--debug`` keeps it
for user errors too (``cli.errors``); a command that uses devices says when an XLA compilation
runs long (``cli.compile_notice``); transformers' advisory banners (``PyTorch was not found``,
meaningless for commands that only tokenize) are silenced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys

from expint_jax.cli import errors


@dataclasses.dataclass(frozen=True)
class Command:
    module: str
    summary: str
    uses_devices: bool = True  # start multi-host JAX before running it
    function: str = "main"  # the module's ``(argv) -> int`` entry point


COMMANDS: dict[str, Command] = {
    "run": Command("expint_jax.cli.run", "run the self-evolution loop: rollouts, extraction, distillation, evaluation, report"),
    "extract": Command("expint_jax.cli.stages", "one iteration's extraction rollouts and experience pool, over a run directory",
                       function="extract_main"),
    "distill": Command("expint_jax.cli.stages", "context-distill a Qwen3 (CPU demo by default), or one iteration of a run "
                       "directory", function="distill_main"),
    "eval": Command("expint_jax.cli.stages", "evaluate one iteration's policy in every mode, over a run directory",
                    function="eval_main"),
    "report": Command("expint_jax.cli.stages", "rebuild a run's report.md, plots and TensorBoard scalars",
                      uses_devices=False, function="report_main"),
    "export-hf": Command("expint_jax.cli.stages", "export an iteration's policy as a Hugging Face checkpoint",
                         function="export_main"),
    "check-model": Command("expint_jax.cli.check_model", "load a Qwen3 checkpoint onto a mesh and check parity with transformers"),
    "granularity": Command("expint_jax.cli.granularity", "share of URLs, numbers, entities and strategy statements in a pool",
                           uses_devices=False),
    "organism": Command("expint_jax.cli.organism", "the SimWeb model organism: bootstrap its π_0, measure its use of "
                        "experience (gate)"),
    "doctor": Command("expint_jax.cli.doctor", "versions, devices, mesh, and the endpoints and API keys a config needs"),
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
    rest = errors.take_debug_flag(rest)
    asks_help = any(arg in ("-h", "--help") for arg in rest)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # before anything imports transformers
    try:
        with contextlib.ExitStack() as stack:
            if command.uses_devices and not asks_help:
                from expint_jax.cli.compile_notice import announced_compiles
                from expint_jax.parallel import distributed  # imports jax: only for commands that need it

                distributed.initialize()
                stack.enter_context(announced_compiles())
            module = importlib.import_module(command.module)
            return int(getattr(module, command.function)(rest) or 0)
    except SystemExit as done:  # argparse's --help and usage errors: a status, like every command's return
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits with 1
        return 1
    except KeyboardInterrupt:
        if errors.debug_requested():
            raise
        print(f"expint {name}: interrupted; the same command resumes where it stopped", file=sys.stderr)
        return 130
    except Exception as error:  # a user error becomes one line; a bug (or --debug) keeps its traceback
        return errors.report(f"expint {name}", error)
