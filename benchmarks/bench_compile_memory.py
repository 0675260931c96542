"""Per-device memory of the paper configs' programs, compiled at full size on fake CPU devices.

For each model (``configs/paper/qwen3_4b.py``, ``qwen3_8b.py``) and hardware target (the config
file's argument: v5p-8, v4-8, v5p-32, 8xh100) this compiles, with abstract parameters (nothing is
allocated; ``expint_jax.analysis.compiled_memory``), on that target's mesh of fake CPU devices:

  * the distillation train step of the recipe (forward KL, the teacher recomputed in the step),
    and the same step with ``teacher="from_rollout"`` (the ``topk`` loss on the signal the
    teacher's rollout recorded, no teacher model), both with the config's remat, dtypes and
    micro-batching, on the largest batch the config's length budget lets the trainer build: the
    whole optimizer batch (128 rows, scanned in micro-batches inside the step) padded to the
    budget's student and teacher lengths, every student position a loss position;
  * the local engine's prefill and decode loop at the config's rollout batch
    (``policy.max_batch_size`` rows) for the longest prompt the context admits, with the agent's
    sampling (temperature, top-p, presence penalty), and the decode loop again recording the
    top-k teacher signal that ``from_rollout`` trains on.

It prints one Markdown table: per device, XLA's argument, output (of which aliased to donated
inputs), temporary and total bytes, the budget of the target's chip and whether the program fits,
and the compile time. The figures are XLA:CPU's buffer assignment for the same sharded program
(see the module docstring of ``compiled_memory`` for what carries over to TPU/GPU).

    python benchmarks/bench_compile_memory.py
    python benchmarks/bench_compile_memory.py --models qwen3_8b --targets 8xh100 --mesh 1,4,2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import peak_rss_mib, prepare_environment  # noqa: E402

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
MODELS = ("qwen3_4b", "qwen3_8b")
TARGETS = ("v5p-8", "v4-8", "v5p-32", "8xh100")
TARGET_DEVICES = {"v5p-8": 4, "v4-8": 4, "v5p-32": 16, "8xh100": 8}
COUNT_FLAG = "--xla_force_host_platform_device_count"

if TYPE_CHECKING:  # jax may be imported only after prepare_environment()
    from expint_jax.analysis.compiled_memory import CompiledMemory, MemoryBudget, SamplerCase, TrainCase


@dataclasses.dataclass(frozen=True)
class PaperPrograms:
    """The programs of one paper config on one hardware target (module docstring)."""

    model: str
    target: str
    budget: MemoryBudget
    train: TrainCase  # the recipe, teacher recomputed
    train_from_rollout: TrainCase  # the same step on the rollout's teacher signal
    sampler: SamplerCase
    sampler_with_signal: SamplerCase  # the same, recording the top-k teacher signal


def paper_programs(model: str, target: str, mesh: tuple[int, int, int] | None = None) -> PaperPrograms:
    """The programs of ``configs/paper/<model>.py:<target>``; ``mesh`` (data, fsdp, tensor) replaces
    the target's layout (its chip's budget and the config's micro-batches are kept)."""
    from expint_jax.analysis.compiled_memory import H100, V4, V5P, SamplerCase, TrainCase
    from expint_jax.config import bind, load_config_file
    from expint_jax.distill.batch import BatchShape, bucket_length
    from expint_jax.distill.losses import Divergence
    from expint_jax.llm.sampler.generation import bucket
    from expint_jax.llm.sampler.sampling import from_params, penalties_from_params
    from expint_jax.loop.config import LoopConfig
    from expint_jax.loop.regimes import make_regime
    from expint_jax.models.config import preset
    from expint_jax.parallel.mesh import MeshConfig
    from expint_jax.records import SamplingParams

    c = bind(LoopConfig, load_config_file(PAPER / f"{model}.py", target))
    budget = {"v5p-8": V5P, "v4-8": V4, "v5p-32": V5P, "8xh100": H100}[target]
    layout = c.mesh if mesh is None else MeshConfig(*mesh)
    architecture = preset(Path(c.model.checkpoint).name)
    name = f"{model}:{target}"

    ladder = lambda n: bucket_length(n, c.trainer.batching.min_bucket)  # noqa: E731  the trainer's padding
    student = ladder(c.budget.max_student_tokens)
    shape = BatchShape(c.trainer.batching.rows, student, ladder(c.budget.max_teacher_tokens), student)
    step = make_regime(c).step(c.trainer.step)
    common = dict(model=architecture, mesh=layout, policy=c.model.policy, remat=c.model.remat,
                  optimizer=c.trainer.optimizer)
    train = TrainCase(name=name, shape=shape, step=step, **common)
    top_k = step.divergence.top_k
    from_rollout = TrainCase(
        name=f"{name} from_rollout", shape=dataclasses.replace(shape, signal_k=top_k),
        step=dataclasses.replace(step, teacher="from_rollout", divergence=Divergence("topk", top_k=top_k)), **common)

    a = c.agent
    sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p, presence_penalty=a.presence_penalty,
                              max_tokens=a.max_tokens)
    width = bucket(c.policy.max_context - 1)  # the longest prompt the engine accepts, left-padded
    max_new = bucket(a.max_tokens)
    sampler = SamplerCase(name=name, model=architecture, mesh=layout, rows=c.policy.max_batch_size,
                          prompt_tokens=width, max_new=max_new, slots=bucket(width + max_new),
                          strategy=from_params(sampling), penalties=penalties_from_params(sampling),
                          policy=c.model.policy)
    with_signal = dataclasses.replace(sampler, name=f"{name} signal", top_logprobs=top_k)
    return PaperPrograms(model, target, budget, train, from_rollout, sampler, with_signal)


def _train_shape(case: TrainCase) -> str:
    s, micro = case.shape, case.step.micro_batches
    signal = f", top-{s.signal_k} signal" if s.signal_k else ""
    return (f"{s.rows} rows ({micro} x {s.rows // micro}) x {s.student_tokens:,} student / "
            f"{s.teacher_tokens:,} teacher / {s.loss_tokens:,} loss tokens{signal}")


def _sampler_shape(case: SamplerCase) -> str:
    signal = f", top-{case.top_logprobs} signal" if case.top_logprobs else ""
    return f"{case.rows} rows x {case.prompt_tokens:,} prompt + {case.max_new:,} new, {case.slots:,} slots{signal}"


def measure(programs: PaperPrograms, devices: list) -> list[tuple[str, str, CompiledMemory]]:
    """(program, shape, CompiledMemory) for every program of ``programs``."""
    from expint_jax.analysis.compiled_memory import compile_sampler, compile_train_step

    rows = []
    for label, case in (("train step (teacher recomputed)", programs.train),
                        ("train step (from_rollout)", programs.train_from_rollout)):
        rows.append((label, _train_shape(case), compile_train_step(case, devices)))
    prefill, decode = compile_sampler(programs.sampler, devices)
    rows += [("sampler prefill", _sampler_shape(programs.sampler), prefill),
             ("sampler decode", _sampler_shape(programs.sampler), decode)]
    _, decode = compile_sampler(programs.sampler_with_signal, devices)
    rows.append(("sampler decode (signal)", _sampler_shape(programs.sampler_with_signal), decode))
    return rows


def _ask_for_devices(count: int) -> None:
    """Fake CPU devices for the meshes (before jax is imported), unless XLA_FLAGS already sets a count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {COUNT_FLAG}={count}".strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--mesh", default="", help="data,fsdp,tensor replacing every target's layout (micro-batches kept)")
    args = parser.parse_args(argv)
    models, targets = args.models.split(","), args.targets.split(",")
    for given, known in ((models, MODELS), (targets, TARGETS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {unknown}; choose from {', '.join(known)}")
    mesh = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else None
    cells = [(m, t) for m in models for t in targets if not (m == "qwen3_8b" and t == "v4-8")]  # refused by the config
    _ask_for_devices(max(math.prod(mesh) if mesh else TARGET_DEVICES[t] for _, t in cells))
    prepare_environment()

    import jax

    from expint_jax.analysis.compiled_memory import GB

    start = time.perf_counter()
    print(f"{jax.device_count()} fake {jax.devices()[0].platform} devices, jax {jax.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} at start\n")
    print("| model | target | mesh (data, fsdp, tensor) | program | shape | arguments GB | outputs GB (aliased) "
          "| temporaries GB | total GB | budget | fits | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, target in cells:
        programs = paper_programs(model, target, mesh)
        layout = programs.train.mesh
        devices = jax.devices()[:math.prod((layout.data, layout.fsdp, layout.tensor))]
        for label, shape, m in measure(programs, devices):
            fits = "yes" if m.peak_bytes <= programs.budget.bytes else "**no**"
            print(f"| {model} | {target} | {layout.data}, {layout.fsdp}, {layout.tensor} | {label} | {shape} "
                  f"| {m.argument_bytes / GB:.2f} | {m.output_bytes / GB:.2f} ({m.alias_bytes / GB:.2f}) "
                  f"| {m.temp_bytes / GB:.2f} | {m.peak_bytes / GB:.2f} | {programs.budget.bytes / GB:g} "
                  f"| {fits} | {m.compile_seconds:.0f} |", flush=True)
    print(f"\nwall time {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_mib():,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
