"""``expint run``: the self-evolution loop over iterations (``expint_jax.loop``).

    expint run                                            # configs/loop_tiny.py
    expint run --config configs/recipe.py --config.iterations=5
    expint run --config configs/recipe.py --restart-from train     # redo train and all after it
    expint run --config configs/recipe.py --restart-from iter_001/extract
    expint run --config configs/recipe.py --show-config           # every field of the resolved config

Outputs under ``<runs_dir>/<name>/``: ``iter_<k>/<stage>/`` per stage (see ``loop.layout``),
``report.md``, ``plots/``, ``tensorboard/``. Rerunning the same command resumes: finished stages
are skipped, a killed one continues. Every configuration mistake (unknown key, wrong type, a
name that does not exist, a missing checkpoint, a writer endpoint without its key variable, a
changed setting of a finished stage) stops the command at start-up with one line, exit status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "loop_tiny.py"
USAGE = __doc__


def split_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """``--name VALUE`` / ``--name=VALUE`` taken out of ``argv`` (the rest go to the config flags)."""
    value, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 == len(argv):
                raise ValueError(f"{name} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def load_loop_config(command: str, argv: list[str]):
    """The bound and checked ``LoopConfig`` of a command line (``ConfigError`` on any mistake)."""
    from expint_jax.config import bind, parse_command_line
    from expint_jax.loop.config import LoopConfig, check_config

    config = bind(LoopConfig, parse_command_line(command, argv, DEFAULT_CONFIG))
    check_config(config)
    return config


def main(argv: list[str] | None = None) -> int:
    from expint_jax.cli import errors
    from expint_jax.config import ConfigError, format_config
    from expint_jax.loop.layout import StaleStageError

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    show = "--show-config" in argv
    try:
        restart_from, rest = split_option([a for a in argv if a != "--show-config"], "--restart-from")
        config = load_loop_config("expint run", rest)
    except (ConfigError, ValueError) as e:
        return errors.refuse("expint run", e)
    if show:
        print(format_config(config))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from expint_jax import xla_cache
    from expint_jax.loop.driver import run_loop

    xla_cache.enable()
    try:
        result = run_loop(config, restart_from=restart_from, echo=lambda line: print(line, flush=True))
    except (StaleStageError, ConfigError) as e:
        return errors.refuse("expint run", e)
    ran = f"{len(result.ran)} stages run, {len(result.skipped)} found done"
    if result.stopped:
        print(f"stopped early: {result.stopped}")
    print(f"done ({ran}); the report is {result.report}")
    return 0
