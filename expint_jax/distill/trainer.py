"""The distillation trainer: one loop over the batches, jitted steps, evaluation, checkpoints, resume.

Contract of ``train(config, student, teacher, train_data, eval_data, output_dir=...)``:
  * Trains ``student`` on ``config.epochs`` epochs of ``BatchIterator`` batches with the jitted,
    state-donating step of ``step.make_train_step`` (on ``mesh`` when given: parameters placed by
    the logical-axis ``rules``, batch rows on the ``batch`` axis). The learning-rate schedule
    spans the whole run: ``optimizer.total_steps`` is set to the number of batches.
    On return ``student`` holds the trained parameters (its own buffers were donated).
  * Run directory ``output_dir``: ``checkpoints/<step>/`` (orbax: ``state`` = parameters,
    optimizer state and step; ``data`` = the data iterator's JSON state), ``metrics/train.jsonl``,
    ``metrics/eval.jsonl``, ``metrics/tensorboard/`` and ``data_counts.json``.
  * Checkpoints every ``checkpoint_every`` steps and at the end, keeping the last
    ``keep_checkpoints``. Resume: when the run directory holds a checkpoint, the state is restored
    into the current state's shapes and shardings, the data iterator continues with the next
    batch, and metric rows logged after that checkpoint are discarded, so a killed and resumed
    run ends bitwise equal to an uninterrupted one (same data, config and devices).
  * Train metrics every ``log_every`` steps: the step's (loss, kl, tokens = loss tokens,
    student_tokens = non-padding student tokens, sequences, grad_norm, learning_rate) and the
    host-measured rates over the steps since the previous row (``loss_tokens_per_second``,
    ``student_tokens_per_second`` (what the benchmarks count) and ``step_seconds``), excluding
    evaluation and checkpoint time; the first row includes compilation. Held-out loss every
    ``eval_every`` steps and at the end, aggregated exactly over all eval batches
    (``aggregate_eval``: Σ loss_total / Σ loss_count; kl weighted by tokens). An eval set with no
    example is refused up front.
  * Teacher: ``teacher`` is the frozen model the step runs (``config.step.teacher="recompute"``), or
    None when the step needs none: the ``nll`` loss, or ``config.step.teacher="from_rollout"``,
    which trains on the teacher signal its rollout recorded (``train_data`` and ``eval_data`` must
    then carry it, ``pipeline.build_examples(..., signals=...)``; checked up front): no teacher
    forward pass and no teacher parameters in any step.
  * Parameters stored below float32 (bfloat16) train with float32 master weights in the
    optimizer state (``optim.with_master_weights``).
  * A non-finite loss or gradient norm raises ``TrainingDiverged`` naming the step, its epoch and
    batch, and the task ids in it. The bad state is never saved: the last checkpoint on disk is
    the last good one. Metrics are fetched from the device only at log, eval and checkpoint steps
    (so dispatch runs ahead); every step since the previous fetch is checked then.
  * Multi-process: each process feeds its rows (``jax.make_array_from_process_local_data``); all
    take part in checkpointing; only process 0 writes metrics and the progress bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from expint_jax import storage
from expint_jax.distill.batch import DistillBatch
from expint_jax.distill.metrics_log import MetricsLog
from expint_jax.distill.optim import OptimizerConfig, make_optimizer, needs_master_weights
from expint_jax.distill.pipeline import BatchingConfig, BatchIterator, ExampleCounts, ExampleSet, HostBatch
from expint_jax.distill.step import StepConfig, TrainState, init_train_state, make_eval_step, make_train_step
from expint_jax.parallel.placement import shard_batch, shard_model
from expint_jax.parallel.rules import DEFAULT_RULES, LogicalRules

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss or gradient norm; nothing after the last checkpoint was saved."""


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    step: StepConfig = StepConfig()  # divergence, reduction, micro_batches
    batching: BatchingConfig = BatchingConfig()  # rows per batch, seed, length buckets
    optimizer: OptimizerConfig = OptimizerConfig()  # total_steps is replaced by the run's length
    epochs: int = 1
    max_steps: int | None = None  # stop early; the schedule still spans every epoch
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only at the end
    eval_at_start: bool = False  # also evaluate the untrained student (logged as step 0) on a fresh run
    log_every: int = 1
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"TrainerConfig.eval_every must be >= 0 (0 = only at the end), got {self.eval_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"TrainerConfig.max_steps must be >= 1 or None, got {self.max_steps}")
        if self.batching.rows % self.step.micro_batches:
            raise ValueError(f"TrainerConfig: batching.rows={self.batching.rows} does not split into "
                             f"step.micro_batches={self.step.micro_batches} equal micro-batches")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    state: TrainState  # final parameters, optimizer state and step
    steps: int  # optimizer steps taken, counting those before a resume
    resumed_from: int  # step of the checkpoint the call started from (0: a fresh run)
    stop_reason: Literal["completed", "max_steps"]
    train_metrics: Mapping[str, float]  # the last logged step's (empty if this call ran no step)
    eval_metrics: Mapping[str, float]  # the last evaluation's (empty without eval data)
    data_counts: ExampleCounts
    initial_eval_metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)  # eval_at_start's


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """A step whose metrics are still on the device."""

    step: int
    host_batch: HostBatch
    metrics: Mapping[str, jax.Array]


class _Throughput:
    """Host wall time and tokens of the training steps between two log rows (eval/saves excluded)."""

    def __init__(self) -> None:
        self.seconds = self.loss_tokens = self.student_tokens = 0.0
        self.steps = 0
        self._since = time.perf_counter()

    def pause(self) -> None:
        self.seconds += time.perf_counter() - self._since

    def resume(self) -> None:
        self._since = time.perf_counter()

    def add(self, row: Mapping[str, float]) -> None:
        self.loss_tokens += row["tokens"]
        self.student_tokens += row["student_tokens"]
        self.steps += 1

    def take(self) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        rates = {"loss_tokens_per_second": self.loss_tokens / seconds,
                 "student_tokens_per_second": self.student_tokens / seconds,
                 "step_seconds": self.seconds / max(self.steps, 1)}
        self.seconds = self.loss_tokens = self.student_tokens = 0.0
        self.steps = 0
        return rates


def train(
    config: TrainerConfig,
    student: nnx.Module,
    teacher: nnx.Module | None,
    train_data: ExampleSet,
    eval_data: ExampleSet | None = None,
    *,
    output_dir: str | Path,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Trains ``student`` toward ``teacher`` (frozen; ``None`` only for the ``nll`` loss); see the module docstring.

    Args:
      config: the run (steps, loss, optimizer, batching, checkpoints, metrics).
      student: the model to train; updated in place and returned in the result.
      teacher: the frozen model whose experience-conditioned distribution is the target (None when
        ``config.step.needs_teacher`` is False: ``nll``, or ``teacher="from_rollout"``).
      train_data: the training examples (teacher and student views of each trajectory).
      eval_data: held-out examples scored before training, at each eval interval and at the end.
      output_dir: the run directory (checkpoints, metrics); a checkpoint there is resumed from.
      mesh: device mesh for the sharded step (required with several processes).
      rules: logical-axis rules placing parameters and batch rows on the mesh.
      on_step: called on the host with the step number after each step is dispatched (progress hooks).
    """
    needs_teacher = config.step.needs_teacher
    if needs_teacher and teacher is None:
        raise ValueError(f"divergence {config.step.divergence.kind!r} needs a teacher model, got teacher=None")
    if config.step.from_rollout:
        _check_signal(train_data, "train_data", config.step)
        if eval_data is not None:
            _check_signal(eval_data, "eval_data", config.step)
    if jax.process_count() > 1 and mesh is None:
        raise ValueError(f"{jax.process_count()} processes: multi-process training needs a mesh")
    if eval_data is not None and not eval_data.examples:
        raise ValueError(f"the eval set holds no example (counts: {eval_data.counts.to_json()}): every eval record "
                         "was dropped or skipped; fix the eval data or its length budget, or pass eval_data=None")
    if not str(output_dir):
        raise ValueError("train: output_dir must name a directory")
    out = Path(output_dir)
    batches = BatchIterator(train_data, config.batching, config.epochs)
    total = len(batches) if config.max_steps is None else min(config.max_steps, len(batches))
    tx, schedule = make_optimizer(_optimizer_for_run(config.optimizer, len(batches)),
                                  master_weights=needs_master_weights(nnx.state(student, nnx.Param)))
    is_logger = jax.process_index() == 0
    if is_logger:
        storage.write_json(out / "data_counts.json", {
            "train": train_data.counts.to_json(), "eval": eval_data.counts.to_json() if eval_data else None})

    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))
            shard_model(student, mesh, rules)
            if teacher is not None and needs_teacher:
                shard_model(teacher, mesh, rules)
        graphdef, state = init_train_state(student, tx)
        teacher_graphdef = teacher_params = None
        if teacher is not None and needs_teacher:
            teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
            teacher_params = _unshared(teacher_params, state.params)
        train_step = make_train_step(graphdef, tx, schedule, config.step, teacher_graphdef=teacher_graphdef)
        eval_step = make_eval_step(graphdef, config.step, teacher_graphdef=teacher_graphdef)
        to_device = functools.partial(shard_batch, mesh=mesh, rules=rules)

        manager = stack.enter_context(ocp.CheckpointManager(
            (out / "checkpoints").absolute(), item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, cleanup_tmp_directories=True)))
        state, resumed_from = _restore_latest(manager, state, batches)
        metrics_log = stack.enter_context(MetricsLog(out / "metrics", resume_step=resumed_from, enabled=is_logger))
        progress = stack.enter_context(tqdm(total=total, initial=min(resumed_from, total), desc="distill",
                                            unit="step", disable=not (config.progress_bar and is_logger)))
        train_metrics: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        initial_eval_metrics: dict[str, float] = {}
        if eval_data is not None and config.eval_at_start and resumed_from == 0:
            initial_eval_metrics = _evaluate(eval_step, state.params, teacher_params, eval_data, config.batching,
                                             to_device)
            metrics_log.write("eval", 0, initial_eval_metrics)
        dispatched: list[_Dispatched] = []
        throughput = _Throughput()
        step = resumed_from
        for host_batch in itertools.islice(batches, max(total - resumed_from, 0)):
            state, metrics = train_step(state, teacher_params, to_device(host_batch.batch))
            step = host_batch.index + 1
            dispatched.append(_Dispatched(step, host_batch, metrics))
            progress.update()
            if on_step is not None:
                on_step(step)
            last = step == total
            log_now = last or step % config.log_every == 0
            eval_now = eval_data is not None and (last or (config.eval_every and step % config.eval_every == 0))
            save_now = last or step % config.checkpoint_every == 0
            if not (log_now or eval_now or save_now):
                continue
            fetched = _fetch_checked(dispatched, manager)
            dispatched.clear()
            throughput.pause()
            for row in fetched:
                throughput.add(row)
            if log_now:
                train_metrics = {**fetched[-1], **throughput.take(), "epoch": host_batch.epoch}
                metrics_log.write("train", step, train_metrics)
                progress.set_postfix(loss=f"{train_metrics['loss']:.4g}")
            if eval_now:
                eval_metrics = _evaluate(eval_step, state.params, teacher_params, eval_data, config.batching, to_device)
                metrics_log.write("eval", step, eval_metrics)
            if save_now:
                manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           data=ocp.args.JsonSave(batches.get_state())))
            throughput.resume()
    nnx.update(student, state.params)
    return TrainResult(state=state, steps=step, resumed_from=resumed_from,
                       stop_reason="completed" if total == len(batches) else "max_steps",
                       train_metrics=train_metrics, eval_metrics=eval_metrics, data_counts=train_data.counts,
                       initial_eval_metrics=initial_eval_metrics)


def _check_signal(data: ExampleSet, name: str, step: StepConfig) -> None:
    """Every example of ``data`` carries a rollout signal with at least the divergence's top_k."""
    missing = [e.task_id for e in data.examples if e.signal_k == 0]
    if missing:
        raise ValueError(f"StepConfig.teacher='from_rollout': {len(missing)} of {len(data)} examples of {name} carry "
                         f"no rollout teacher signal (e.g. {missing[:3]}); build them with signals "
                         "(pipeline.load_examples(..., with_signal=True)) or train with teacher='recompute'")
    k = data.signal_k
    if k < step.divergence.top_k:
        raise ValueError(f"StepConfig.teacher='from_rollout': {name} recorded the teacher's top {k} tokens, "
                         f"Divergence.top_k={step.divergence.top_k} needs at least that many")


def _optimizer_for_run(optimizer: OptimizerConfig, steps: int) -> OptimizerConfig:
    if optimizer.warmup_steps > steps:
        raise ValueError(f"optimizer.warmup_steps={optimizer.warmup_steps} exceeds the run's {steps} steps")
    return dataclasses.replace(optimizer, total_steps=steps)


def _unshared(teacher_params: nnx.State, student_params: nnx.State) -> nnx.State:
    """The teacher's parameters with copies of any buffer the student also holds: the training step
    donates the student's buffers, which would delete a teacher sharing them (e.g. ``nnx.clone``)."""
    student_ids = {id(x) for x in jax.tree.leaves(student_params)}
    return jax.tree.map(lambda x: jnp.copy(x) if id(x) in student_ids else x, teacher_params)


def _restore_latest(manager: ocp.CheckpointManager, state: TrainState,
                    batches: BatchIterator) -> tuple[TrainState, int]:
    """The latest checkpoint restored into ``state``'s shapes and shardings (and ``batches`` advanced), if any."""
    latest = manager.latest_step()
    if latest is None:
        return state, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               data=ocp.args.JsonRestore()))
    batches.set_state(restored.data)
    log.info("resumed from the checkpoint at step %d in %s", latest, manager.directory)
    return restored.state, latest


def _fetch_checked(dispatched: list[_Dispatched], manager: ocp.CheckpointManager) -> list[dict[str, float]]:
    """Host metrics of every dispatched step, in order; raises on the first non-finite one."""
    rows = []
    for item in dispatched:
        row = {name: float(np.asarray(value)) for name, value in jax.device_get(dict(item.metrics)).items()}
        if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
            manager.wait_until_finished()
            last_saved = manager.latest_step()
            batch = item.host_batch
            raise TrainingDiverged(
                f"step {item.step} (epoch {batch.epoch}, batch {batch.index}): non-finite loss={row['loss']} "
                f"grad_norm={row['grad_norm']} on tasks {list(batch.task_ids)}. Stopped without saving this state; "
                f"the last checkpoint on disk is step {last_saved} in {manager.directory}")
        rows.append(row)
    return rows


def eval_batches(data: ExampleSet, batching: BatchingConfig) -> Iterator[DistillBatch]:
    """Host batches holding every example of ``data`` once (this process's rows; the last batch padded)."""
    for host_batch in BatchIterator(data, dataclasses.replace(batching, drop_remainder=False), epochs=1):
        yield host_batch.batch


def aggregate_eval(per_batch: Iterable[Mapping[str, jax.Array | float]]) -> dict[str, float]:
    """Held-out metrics from the eval step's metrics of each batch: exact sums, not a mean of batch
    means (loss = Σ loss_total / Σ loss_count). ``kl`` is reported only when the step reports it
    (e.g. not for ``nll``); the step reports it token-averaged, so Σ kl·tokens / Σ tokens is exact."""
    sums = dict.fromkeys(("loss_total", "loss_count", "kl_total", "tokens", "sequences"), 0.0)
    has_kl = False
    for metrics in per_batch:
        metrics = jax.device_get(metrics)
        for name in ("loss_total", "loss_count", "tokens", "sequences"):
            sums[name] += float(metrics[name])
        if "kl" in metrics:
            has_kl = True
            sums["kl_total"] += float(metrics["kl"]) * float(metrics["tokens"])
    result = {"loss": sums["loss_total"] / max(sums["loss_count"], 1.0), "tokens": sums["tokens"],
              "sequences": sums["sequences"]}
    if has_kl:
        result["kl"] = sums["kl_total"] / max(sums["tokens"], 1.0)
    return result


def _evaluate(eval_step, params: nnx.State, teacher_params: nnx.State | None, data: ExampleSet,
              batching: BatchingConfig, to_device: Callable[[DistillBatch], DistillBatch]) -> dict[str, float]:
    """Held-out metrics over every eval example (``aggregate_eval``)."""
    return aggregate_eval(eval_step(params, teacher_params, to_device(batch)) for batch in eval_batches(data, batching))
