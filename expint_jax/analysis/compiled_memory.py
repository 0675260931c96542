"""Per-device memory of the compiled train step and sampler, from shapes alone (nothing allocated).

A Qwen3-4B/8B run at 32K tokens cannot be run here, but its programs can be compiled: every
input is a ``jax.ShapeDtypeStruct`` carrying the sharding the real run gives it, the jitted
functions are the ones the trainer and the engine call (``distill.step.make_train_step``,
``llm.sampler.prefill`` / ``decode``), and ``jax.jit(...).lower(...).compile()`` on a mesh of
(fake CPU) devices yields the SPMD-partitioned program of one device. Its
``compiled.memory_analysis()`` is XLA's buffer assignment for that program: bytes of arguments,
outputs, outputs aliased to donated arguments, and temporaries, per device.

What the figures mean: they are XLA:CPU's buffer assignment of the same sharded program, not a
TPU's or GPU's. Arguments and outputs (parameters, optimizer state, KV cache, batch) are layout
facts and carry over (``jit`` leaves out arguments the program never reads). Temporaries depend on
the backend's fusion, scheduling and float normalization: XLA:CPU computes some bfloat16 values in
float32 (at 32K tokens it holds the remat scan's stacked per-layer residuals both in bfloat16 and
in float32), and an accelerator's compiler fuses and schedules differently. So the temporaries
are an estimate of the same order, not the accelerator's number: a fit here is evidence, not
proof, and a miss is a reason to change the layout.

Contract:
  * ``TrainCase`` / ``SamplerCase`` describe one program (model, dtypes, remat, mesh, shapes);
    ``compile_train_step`` compiles the train step, ``compile_sampler`` the prefill and then the
    decode loop (fed the cache as the compiled prefill places it); each program gives a
    ``CompiledMemory`` (per-device bytes + compile seconds).
  * ``CompiledMemory.peak_bytes`` = arguments + outputs - aliased + temporaries: XLA's own total
    for a program whose donated inputs are reused for its outputs.
  * ``check_fits(memory, budget)`` raises ``MemoryBudgetExceeded`` naming the program, the budget
    (``V5P``, ``H100``, ...) and every figure when the peak does not fit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from expint_jax.distill.batch import BatchShape, DistillBatch, SignalBatch, padding_row
from expint_jax.distill.optim import OptimizerConfig, make_optimizer, needs_master_weights, state_shardings
from expint_jax.distill.step import StepConfig, TrainState, make_train_step
from expint_jax.llm.sampler.generation import decode, prefill
from expint_jax.llm.sampler.sampling import Penalties, Strategy
from expint_jax.llm.sampler.stops import MIN_STATES
from expint_jax.models.config import DTypePolicy, Qwen3Config
from expint_jax.models.init import abstract_model
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from expint_jax.parallel.placement import batch_sharding
from expint_jax.parallel.rules import DEFAULT_RULES, LogicalRules, param_shardings

GB = 10**9


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """Memory of one accelerator chip, in bytes (decimal GB, as vendors state it)."""

    name: str
    bytes: int

    def __str__(self) -> str:
        return f"{self.name} ({self.bytes / GB:g} GB per device)"


V5P = MemoryBudget("TPU v5p", 95 * GB)
H100 = MemoryBudget("H100", 80 * GB)
V4 = MemoryBudget("TPU v4", 32 * GB)


class MemoryBudgetExceeded(AssertionError):
    """A compiled program needs more memory per device than the budget it was checked against."""


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Per-device bytes of one compiled program (``compiled.memory_analysis()``) and its compile time."""

    program: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (counted once, in arguments)
    temp_bytes: int
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def summary(self) -> str:
        gb = lambda n: f"{n / GB:.2f} GB"  # noqa: E731
        return (f"{self.program}: per device arguments {gb(self.argument_bytes)}, outputs {gb(self.output_bytes)} "
                f"(aliased {gb(self.alias_bytes)}), temporaries {gb(self.temp_bytes)}, total {gb(self.peak_bytes)}; "
                f"compiled in {self.compile_seconds:.0f} s")


def check_fits(memory: CompiledMemory, budget: MemoryBudget) -> None:
    """Raises ``MemoryBudgetExceeded`` when ``memory`` does not fit ``budget``."""
    if memory.peak_bytes > budget.bytes:
        raise MemoryBudgetExceeded(f"does not fit {budget}: {memory.summary()}")


def _measure(program: str, lowered: jax.stages.Lowered) -> CompiledMemory:
    start = time.perf_counter()
    compiled = lowered.compile()
    return _memory(program, compiled, time.perf_counter() - start)


def _memory(program: str, compiled: jax.stages.Compiled, seconds: float) -> CompiledMemory:
    stats = compiled.memory_analysis()
    return CompiledMemory(program, int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                          int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes), seconds)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    """``abstract``'s ShapeDtypeStructs with the shardings of ``shardings`` (one leaf per array, same order)."""
    leaves, treedef = jax.tree.flatten(abstract)
    placed = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(placed) != len(leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(placed)} shardings")
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                        for x, s in zip(leaves, placed)])


def abstract_params(config: Qwen3Config, mesh: jax.sharding.Mesh, *, policy: DTypePolicy, rules: LogicalRules,
                    remat: str = "none") -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and parameters as sharded ``ShapeDtypeStruct``s, placed as ``shard_model`` places them."""
    graphdef, state = abstract_model(config, policy=policy, rules=rules, remat=remat)
    others = [type(v).__name__ for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
              if not isinstance(v, nnx.Param)]
    if others:
        raise ValueError(f"the model holds non-parameter state {sorted(set(others))}; the train step takes Params only")
    return graphdef, _with_shardings(state, param_shardings(state, mesh, rules))


# -- the distillation train step ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainCase:
    """One train step program: the whole optimizer batch (``shape.rows``), scanned in
    ``step.micro_batches`` micro-batches inside the step, as the trainer calls it."""

    name: str
    model: Qwen3Config
    mesh: MeshConfig
    shape: BatchShape
    step: StepConfig = StepConfig()
    policy: DTypePolicy = DTypePolicy()
    remat: str = "none"
    optimizer: OptimizerConfig = OptimizerConfig()
    rules: LogicalRules = DEFAULT_RULES

    def __post_init__(self) -> None:
        if self.step.from_rollout != bool(self.shape.signal_k):
            raise ValueError(f"{self.name}: teacher={self.step.teacher!r} needs shape.signal_k "
                             f"{'> 0' if self.step.from_rollout else '= 0'}, got {self.shape.signal_k}")
        if self.shape.rows % self.step.micro_batches:
            raise ValueError(f"{self.name}: {self.shape.rows} rows do not split into {self.step.micro_batches} "
                             "micro-batches")


def abstract_batch(shape: BatchShape, mesh: jax.sharding.Mesh, rules: LogicalRules) -> DistillBatch:
    """A batch of ``shape`` as ``ShapeDtypeStruct``s, rows sharded as ``shard_batch`` shards them."""
    sharding = batch_sharding(mesh, shape.rows, rules)
    fields = {name: jax.ShapeDtypeStruct((shape.rows, *row.shape), row.dtype, sharding=sharding)
              for name, row in padding_row(shape).items()}  # one row's fields, in the batch's dtypes
    return (SignalBatch if shape.signal_k else DistillBatch)(**fields)


def compile_train_step(case: TrainCase, devices: Sequence[jax.Device] | None = None) -> CompiledMemory:
    """Lowers and compiles ``make_train_step`` for ``case`` on its mesh; returns the per-device memory."""
    mesh = make_mesh(case.mesh, devices)
    graphdef, params = abstract_params(case.model, mesh, policy=case.policy, rules=case.rules, remat=case.remat)
    tx, schedule = make_optimizer(case.optimizer, master_weights=needs_master_weights(params))
    with jax.set_mesh(mesh):
        shapes = jax.eval_shape(tx.init, params)
        opt_state = _with_shardings(shapes, state_shardings(shapes, params))  # as init_train_state places it
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = TrainState(params=params, opt_state=opt_state,
                           step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
        teacher_graphdef = teacher = None
        if case.step.needs_teacher:  # the frozen teacher: the same model without remat (it runs forward only)
            teacher_graphdef, teacher = abstract_params(case.model, mesh, policy=case.policy, rules=case.rules)
        train_step = make_train_step(graphdef, tx, schedule, case.step, teacher_graphdef=teacher_graphdef)
        lowered = train_step.lower(state, teacher, abstract_batch(case.shape, mesh, case.rules))
        return _measure(f"train step {case.name}", lowered)


# -- the sampler ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerCase:
    """The engine's prefill and decode loop for one batch of ``rows`` prompts of ``prompt_tokens``
    (left-padded width) with up to ``max_new`` new tokens each, in a cache of ``slots`` slots."""

    name: str
    model: Qwen3Config
    mesh: MeshConfig
    rows: int
    prompt_tokens: int
    max_new: int
    slots: int
    strategy: Strategy
    penalties: Penalties | None = None
    top_logprobs: int = 0  # k of the recorded teacher signal (0 = off)
    stop_states: int = MIN_STATES  # the stop automaton's padded states (the agent's two tags: 28 -> 32)
    policy: DTypePolicy = DTypePolicy()
    rules: LogicalRules = DEFAULT_RULES

    def __post_init__(self) -> None:
        if self.prompt_tokens + self.max_new > self.slots:
            raise ValueError(f"{self.name}: {self.prompt_tokens} prompt + {self.max_new} new tokens do not fit "
                             f"{self.slots} cache slots")


def _host(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    """A host (NumPy) argument: the engine passes these uncommitted."""
    return jax.ShapeDtypeStruct(shape, dtype)


def compile_sampler(case: SamplerCase, devices: Sequence[jax.Device] | None = None
                    ) -> tuple[CompiledMemory, CompiledMemory]:
    """Lowers and compiles the sampler's ``prefill`` and then its ``decode`` loop for ``case``, the
    loop's cache and logits placed as the compiled prefill leaves them; returns both programs'
    per-device memory."""
    mesh = make_mesh(case.mesh, devices)
    with jax.set_mesh(mesh):
        graphdef, params = abstract_params(case.model, mesh, policy=case.policy, rules=case.rules)
        rows = case.rows
        ids = _host((rows, case.prompt_tokens), jnp.int32)
        valid = _host((rows, case.prompt_tokens), jnp.bool_)
        lowered = prefill.lower(graphdef, params, ids, ids, valid, num_slots=case.slots)
        start = time.perf_counter()
        compiled = lowered.compile()
        prefill_memory = _memory(f"prefill {case.name}", compiled, time.perf_counter() - start)
        cache, logits = _with_shardings(lowered.out_info, compiled.output_shardings)
        lowered = decode.lower(
            graphdef, params, cache, logits,
            _host((rows,), jnp.int32),  # positions
            _host((rows,), jax.random.key(0).dtype),  # row keys
            _host((rows,), jnp.int32),  # limits
            _host((4,), jnp.int32),  # eos ids (generation.padded_eos)
            _host((case.stop_states, case.model.vocab_size), jnp.int32),  # stop transitions
            strategy=case.strategy, max_new=case.max_new, penalties=case.penalties, top_logprobs=case.top_logprobs)
        return prefill_memory, _measure(f"decode {case.name}", lowered)
