"""The loop's stages one at a time, over an existing run directory (made by ``expint run``):

    expint extract RUN_DIR [--iteration K]     # the extraction rollouts and E_K
    expint distill RUN_DIR [--iteration K]     # the distillation data and training: π_{K+1}
    expint eval RUN_DIR [--iteration K]        # evaluate π_{K+1} (and, for K = 0, the base π_0)
    expint report RUN_DIR                      # rebuild report.md, plots/ and tensorboard/
    expint export-hf RUN_DIR --iteration K --out DIR [--dtype bfloat16]   # π_{K+1} for vLLM/SGLang

Each uses the configuration the run stored (``RUN_DIR/config.json``); a stage already finished
is reported, not redone (``expint run --restart-from`` redoes stages). ``--iteration`` defaults
to the latest iteration whose inputs are finished. Errors are one line, exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = __doc__
STAGES_OF = {"extract": ("rollouts", "extract"), "distill": ("data", "train"), "eval": ("base_eval", "eval")}


def _options(argv: list[str], names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    from expint_jax.cli.run import split_option

    values = {}
    for name in names:
        value, argv = split_option(argv, name)
        if value is not None:
            values[name] = value
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]}; see --help")
    return argv, values


def load_run(run_dir: str | Path):
    """The ``LoopConfig`` a run stored, pointed at ``run_dir`` wherever it now is."""
    import dataclasses

    from expint_jax import storage
    from expint_jax.config import bind
    from expint_jax.loop.config import LoopConfig

    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.exists():
        raise ValueError(f"{run_dir}: no config.json; is it a run directory made by `expint run`?")
    config = bind(LoopConfig, storage.read_json(path), str(path))
    return dataclasses.replace(config, runs_dir=str(run_dir.parent), name=run_dir.name)


def _iteration(run_dir: Path, config, names: tuple[str, ...], given: str | None) -> int:
    from expint_jax.loop.driver import missing_inputs
    from expint_jax.loop.layout import StageId

    if given is not None:
        if not given.isdigit() or int(given) >= config.iterations:
            raise ValueError(f"--iteration {given}: the run has iterations 0..{config.iterations - 1}")
        return int(given)
    ready = [k for k in range(config.iterations)
             if any(not missing_inputs(run_dir, StageId(k, n)) for n in names if not (n == "base_eval" and k))]
    if not ready:
        raise ValueError(f"{run_dir}: no iteration has the inputs of {'/'.join(names)} finished; run `expint run`")
    return ready[-1]


def main_for(command: str, argv: list[str]) -> int:
    from expint_jax.cli import errors
    from expint_jax.config import ConfigError
    from expint_jax.loop.layout import StageId, StaleStageError

    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        positional, options = _options(list(argv), ("--iteration", "--out", "--dtype"))
        if len(positional) != 1:
            raise ValueError(f"expected one RUN_DIR, got {positional or 'none'}")
        run_dir = Path(positional[0])
        if command == "report":
            from expint_jax.loop.report import write_report

            if not (run_dir / "config.json").exists():
                raise ValueError(f"{run_dir}: no config.json; is it a run directory made by `expint run`?")
            print(f"report: {write_report(run_dir)}")
            return 0
        config = load_run(run_dir)
        if command == "export-hf":
            return _export(run_dir, config, options)
        names = STAGES_OF[command]
        k = _iteration(run_dir, config, names, options.get("--iteration"))
        only = [StageId(k, n) for n in names if not (n == "base_eval" and k)]
        from expint_jax.loop.driver import run_loop

        run_loop(config, only=only, echo=lambda line: print(line, flush=True))
        return 0
    except (ConfigError, StaleStageError, ValueError, FileNotFoundError) as e:
        return errors.refuse(f"expint {command}", e)


def _export(run_dir: Path, config, options: dict[str, str]) -> int:
    from expint_jax.models.hf import save_checkpoint
    from expint_jax.models.source import load_model
    from expint_jax.models.tokenizer import load_tokenizer

    if "--iteration" not in options or "--out" not in options:
        raise ValueError("export-hf needs --iteration K and --out DIR")
    k = int(options["--iteration"])
    policy = run_dir / f"iter_{k:03d}" / "train" / "policy"
    if not (policy / "config.json").exists():
        raise ValueError(f"{policy}: iteration {k} has not finished training")
    out = Path(options["--out"])
    import jax

    if jax.process_index() == 0:  # a model on this process's devices alone: one process exports it
        save_checkpoint(load_model(policy, config.model), out, dtype=options.get("--dtype"),
                        tokenizer=load_tokenizer(str(policy)))
    print(f"π_{k + 1} exported to {out}")
    return 0


def extract_main(argv: list[str] | None = None) -> int:
    return main_for("extract", list(sys.argv[1:] if argv is None else argv))


def eval_main(argv: list[str] | None = None) -> int:
    return main_for("eval", list(sys.argv[1:] if argv is None else argv))


def report_main(argv: list[str] | None = None) -> int:
    return main_for("report", list(sys.argv[1:] if argv is None else argv))


def export_main(argv: list[str] | None = None) -> int:
    return main_for("export-hf", list(sys.argv[1:] if argv is None else argv))


def distill_main(argv: list[str] | None = None) -> int:
    """``expint distill RUN_DIR``: the loop's stages; ``expint distill [--config ...]``: the standalone command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        return main_for("distill", argv)
    from expint_jax.distill import run as distill_run

    return distill_run.main(argv)
