"""Side-by-side measurement: each side runs in its own subprocess, rounds interleave the sides.

A benchmark script defines ``sides`` (name -> callable building a zero-argument ``run`` function
and returning it) and calls ``main_side_by_side``. The parent re-invokes the script with
``--worker SIDE`` once per round and side; a worker builds its inputs, runs once untimed (compile
/ warm-up, reported separately), times ``--repeats`` calls and prints one JSON line with the
times and the process's peak resident memory. Separate processes make peak memory per side
honest and keep one framework's threads and caches out of the other's numbers; interleaving
rounds spreads the drift of a shared machine over both sides.

``--huge-pages`` runs every worker, whatever its side, with glibc's malloc asked to back its
large blocks with transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, unless the
caller set that tunable). glibc serves every block above 32 MiB with a fresh ``mmap``, so a
process that allocates big temporaries on every call pays a page fault per 4 KiB touched, on
every call (XLA:CPU allocates a step's temporaries per execution; faulting in 0.72 GB took
150 ms here); with huge pages a fault covers 2 MiB. It is not a free win: it sped up our
training step and slowed our long step-wise scoring pass (``BENCHMARKS.md``), so it is off
unless asked for, and the machine line records the workers' setting.

Every side-by-side script's ``__main__`` calls :func:`prepare_environment` first, before anything
imports jax or torch (see there why the order matters), and declares the random Qwen3's shape with
:func:`add_model_arguments` where it has one. The one thing that stays in each script is the line
putting the repository root on ``sys.path``: ``python benchmarks/bench_X.py`` puts only
``benchmarks/`` there, and this module cannot be imported as ``benchmarks.common`` (the name the
scripts, their workers and the tests share) until that line has run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_calls(run: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    run()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return warmup, times


HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb"
WORKER_FLAG = "--worker"


def prepare_environment(*, passive_openmp: bool = False) -> None:
    """The environment defaults of a side-by-side script; call it first in ``__main__``.

    ``JAX_PLATFORMS=cpu`` (the comparisons are CPU ones) and, with ``passive_openmp``,
    ``OMP_WAIT_POLICY=PASSIVE`` (spinning OpenMP waits slow PyTorch down several-fold on cores
    other processes share, which would flatter us), each only where the caller has not set it.
    It must run before jax or torch is imported, in the parent and so in every worker, which
    inherits this process's environment (:func:`worker_environment`): jax reads ``JAX_PLATFORMS``
    into its config when it is imported and the OpenMP runtime reads ``OMP_WAIT_POLICY`` once,
    when torch loads it, so a later setting would be silently ignored. The scripts therefore
    import jax and torch only inside their side functions (or after this call), never at the
    top; an import that slipped in before raises here rather than measuring the wrong setup.
    """
    early = [name for name in ("jax", "torch") if name in sys.modules]
    if early:
        raise RuntimeError(f"prepare_environment() must run before {' and '.join(early)} is imported")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if passive_openmp:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def add_model_arguments(parser: argparse.ArgumentParser, hidden: int = 512, layers: int = 8) -> None:
    """``--hidden``, ``--layers``, ``--vocab``: the random Qwen3 a script builds (default: the issues' shape)."""
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--vocab", type=int, default=151936)


def is_worker() -> bool:
    """Whether this process is one side's worker (:func:`main_side_by_side` re-ran the script for it)."""
    return WORKER_FLAG in sys.argv


def script_arguments(add_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.Namespace:
    """The script's own arguments from the command line, the harness's ignored, for work outside the harness."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser.parse_known_args()[0]


def worker_environment(huge_pages: bool) -> dict[str, str]:
    """This process's environment plus unbuffered output, and huge-page malloc if asked (module docstring)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tunables = env.get("GLIBC_TUNABLES", "")
    if huge_pages and HUGE_PAGE_TUNABLE not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{HUGE_PAGE_TUNABLE}=1"]))
    return env


def machine_line(env: Mapping[str, str]) -> str:
    load = os.getloadavg()[0]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"python {platform.python_version()}, load average {load:.1f} at start, "
            f"workers' GLIBC_TUNABLES={env.get('GLIBC_TUNABLES') or '(unset)'}")


def main_side_by_side(
    description: str,
    sides: Mapping[str, Callable[[argparse.Namespace], Callable[[], object]]],
    add_arguments: Callable[[argparse.ArgumentParser], None],
    work_per_call: Callable[[argparse.Namespace], tuple[float, str]],
    reference: str,
    interpreters: Mapping[str, str] | None = None,
) -> None:
    """``work_per_call(args) -> (units, unit name)``, e.g. ``(2048, "tokens")``; ratios are vs ``reference``.

    ``interpreters`` maps a side to the Python that runs its worker (default: this one), for a
    library that must live in its own virtualenv."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per worker")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all sides")
    parser.add_argument("--sides", default=",".join(sides), help="comma-separated subset of " + ",".join(sides))
    parser.add_argument("--huge-pages", action="store_true",
                        help="every side's worker mallocs large blocks on transparent huge pages")
    parser.add_argument(WORKER_FLAG, choices=list(sides), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        warmup, times = time_calls(sides[args.worker](args), args.repeats)
        print(json.dumps({"warmup_s": warmup, "times": times, "peak_rss_mib": peak_rss_mib()}))
        return

    chosen = args.sides.split(",")
    forwarded = [a for a in sys.argv[1:] if not a.startswith("--sides")]
    results: dict[str, dict[str, list[float]]] = {s: {"times": [], "warmup_s": [], "peak_rss_mib": []} for s in chosen}
    env = worker_environment(args.huge_pages)
    print(f"# {description}\n# machine: {machine_line(env)}")
    for _ in range(args.rounds):
        for side in chosen:
            python = (interpreters or {}).get(side, sys.executable)
            out = subprocess.run([python, sys.argv[0], *forwarded, WORKER_FLAG, side], capture_output=True,
                                 text=True, env=env)
            if out.returncode:
                sys.exit(f"worker {side} failed:\n{out.stderr[-4000:]}")
            record = json.loads(out.stdout.strip().splitlines()[-1])
            results[side]["times"] += record["times"]
            results[side]["warmup_s"].append(record["warmup_s"])
            results[side]["peak_rss_mib"].append(record["peak_rss_mib"])
    units, unit = work_per_call(args)
    ref = statistics.median(results[reference]["times"]) if reference in results else None
    ref_mem = max(results[reference]["peak_rss_mib"]) if reference in results else None
    header = f"| side | median s/call | {unit}/s | speed vs {reference} | peak RSS MiB | memory vs {reference} | warm-up s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for side in chosen:
        median = statistics.median(results[side]["times"])
        memory = max(results[side]["peak_rss_mib"])
        speed = f"{ref / median:.2f}x" if ref else "-"
        mem_ratio = f"{memory / ref_mem:.2f}x" if ref_mem else "-"
        print(f"| {side} | {median:.4f} | {units / median:,.0f} | {speed} | {memory:,.0f} | {mem_ratio} | "
              f"{statistics.median(results[side]['warmup_s']):.1f} |")
    n = len(results[chosen[0]]["times"])
    print(f"# {n} timed calls per side ({args.rounds} rounds x {args.repeats}); speed = reference time / side time")
