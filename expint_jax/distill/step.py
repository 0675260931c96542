"""One jitted context-distillation step: teacher forward, student forward/backward, optimizer.

``make_train_step`` returns ``step(state, teacher_params, batch) -> (state, metrics)``:
  * the teacher (frozen parameters, its own tree-masked layout) runs inside the same jitted
    function under ``stop_gradient``; the student runs on the plain layout (or, with
    ``student_view="teacher"`` and the ``nll`` loss, on the teacher's layout: SFT with experience
    in context);
  * hidden states are gathered at the loss positions first, then ``chunked_token_losses``
    projects them chunk by chunk (no ``[batch, seq, vocab]`` tensor);
  * the batch is split into ``micro_batches`` scanned with gradient accumulation; the loss is
    normalized once by the whole batch's count (tokens or sequences), so accumulation is exact;
  * gradients are accumulated and handed to the optimizer in float32, whatever the parameters'
    dtype; AdamW (``optim.make_optimizer``) applies the update; the state is donated. Parameters
    below float32 (bfloat16) train only with the optimizer's float32 master weights
    (``make_optimizer(..., master_weights=True)``; ``init_train_state`` checks). For bfloat16
    speed with float32 weights use ``DTypePolicy(param_dtype="float32", compute_dtype="bfloat16")``.
Teacher (``StepConfig.teacher``): ``"recompute"`` runs the teacher as above; ``"from_rollout"``
takes the teacher's distribution from the batch instead (``SignalBatch.teacher_top_ids`` /
``teacher_top_logprobs`` / ``teacher_tail_logmass``: what the teacher's engine recorded while it
wrote the trajectory, ``distill.teacher_signal``), so the step has no teacher forward pass and no
teacher parameters (call it with ``teacher_params=None``). It serves the ``topk`` divergence at
temperature 1 (the recorded distribution is top-k + tail of the unmodified one) and reports no
``kl`` (the full teacher distribution is not known); on the same trajectories its loss equals
``recompute``'s ``topk`` loss to floating-point precision.

Metrics: ``loss``, ``kl`` (forward KL, tracked when the loss is not already it), ``tokens`` (loss
tokens), ``student_tokens`` (non-padding student tokens), ``sequences``, ``grad_norm`` (before
clipping), ``learning_rate``, and ``loss_total`` / ``loss_count`` for exact aggregation across
steps and hosts. ``eval_step`` computes the metrics without updating.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from expint_jax.distill.batch import DistillBatch, SignalBatch
from expint_jax.distill.losses import (
    Divergence,
    LossSums,
    Reduction,
    TeacherTopK,
    chunked_token_losses,
    chunked_weighted_loss,
    reduce_losses,
)
from expint_jax.distill.optim import MasterWeightsState, apply_updates, needs_master_weights, state_shardings
from expint_jax.distill.views import tree_attention_mask

Metrics = dict[str, jax.Array]
_ZERO_SUMS = LossSums(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
TeacherSource = Literal["recompute", "from_rollout"]
StudentView = Literal["plain", "teacher"]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    divergence: Divergence = Divergence("forward_kl")
    reduction: Reduction = "token_mean"
    chunk_size: int = 1024
    micro_batches: int = 1
    track_kl: bool = True  # also report forward KL when the loss is another divergence
    teacher: TeacherSource = "recompute"  # "from_rollout": the batch's recorded teacher signal, no teacher model
    # "teacher": the student reads the teacher's layout (experience in context, step-wise branches
    # tree-packed) -- with the ``nll`` loss, supervised training of behaviour *with* experience in
    # context (the SimWeb model organism's bootstrap). Distillation keeps "plain".
    student_view: StudentView = "plain"

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.teacher not in get_args(TeacherSource):
            raise ValueError(f"StepConfig.teacher must be one of {get_args(TeacherSource)}, got {self.teacher!r}")
        if self.from_rollout and (self.divergence.kind != "topk" or self.divergence.temperature != 1.0):
            raise ValueError(
                f"StepConfig.teacher='from_rollout' needs the 'topk' divergence at temperature 1 (the rollout "
                f"records the teacher's top-k + tail at temperature 1), got kind={self.divergence.kind!r}, "
                f"temperature={self.divergence.temperature}")
        if self.student_view not in get_args(StudentView):
            raise ValueError(f"StepConfig.student_view must be one of {get_args(StudentView)}, got {self.student_view!r}")
        if self.student_view == "teacher" and self.divergence.kind != "nll":
            raise ValueError(f"StepConfig.student_view='teacher' trains on the teacher's own context, where a "
                             f"divergence from the teacher means nothing; it needs the 'nll' loss, got "
                             f"{self.divergence.kind!r}")

    @property
    def from_rollout(self) -> bool:
        return self.teacher == "from_rollout"

    @property
    def kl_is_loss(self) -> bool:
        d = self.divergence
        return d.kind == "forward_kl" or (d.kind == "jsd" and d.beta == 0.0)

    @property
    def tracks_kl(self) -> bool:
        """Whether the step also computes forward KL (it needs the whole teacher distribution)."""
        return self.track_kl and not self.kl_is_loss and self.divergence.kind != "nll" and not self.from_rollout

    @property
    def needs_teacher(self) -> bool:
        """Whether the step runs the teacher model: its loss needs it, or it reports KL(teacher || student).
        Never with ``teacher="from_rollout"`` (the batch carries the teacher's distribution)."""
        if self.from_rollout:
            return False
        return self.divergence.needs_teacher or self.tracks_kl


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Splits ``model`` and initializes ``optimizer`` (its state placed like the parameters,
    ``optim.state_shardings``); parameters below float32 need master weights."""
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = state_shardings(jax.eval_shape(optimizer.init, params), params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings)(params)
    if needs_master_weights(params) and not isinstance(opt_state, MasterWeightsState):
        dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
        raise ValueError(
            f"the student's parameters are stored in {dtypes}: AdamW steps (e.g. lr 1e-5) vanish when rounded to "
            "bfloat16. Train them with float32 master weights (optim.make_optimizer(..., master_weights=True)), or "
            "keep param_dtype='float32' (config key model.param_dtype) and set compute_dtype='bfloat16' "
            "(model.compute_dtype) for bfloat16 speed")
    return graphdef, TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32))


def _gather(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, T, D] at index [B, N] -> [B*N, D]."""
    picked = jnp.take_along_axis(hidden, index[..., None], axis=1)
    return picked.reshape(-1, hidden.shape[-1])


def _micro_losses(
    params: nnx.State,
    teacher_params: nnx.State | None,
    batch: DistillBatch,
    *,
    graphdef: nnx.GraphDef,
    teacher_graphdef: nnx.GraphDef,
    config: StepConfig,
) -> tuple[jax.Array, tuple[LossSums, LossSums]]:
    """Sum-reduced loss of one micro-batch (for the gradient) and its (loss, kl) sums."""
    student = nnx.merge(graphdef, params)
    rows, steps = batch.student_ids.shape
    if config.student_view == "teacher":
        mask = tree_attention_mask(batch.teacher_branch, batch.teacher_attach, batch.teacher_valid)
        hidden = student.hidden_states(batch.teacher_ids, batch.teacher_positions, attention_mask=mask)
        student_hidden = _gather(hidden, batch.teacher_loss_index)
    else:
        positions = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), (rows, steps))
        hidden = student.hidden_states(batch.student_ids, positions, segment_ids=batch.student_valid.astype(jnp.int32))
        student_hidden = _gather(hidden, batch.student_loss_index)
    student_unembed = student.unembedding()

    teacher_hidden = teacher_unembed = None
    spec = config.divergence
    if config.from_rollout:
        if not isinstance(batch, SignalBatch):
            raise ValueError("StepConfig.teacher='from_rollout' needs batches carrying the rollout's teacher signal "
                             "(examples built with signals: pipeline.build_examples(..., signals=...))")
        k = batch.teacher_top_ids.shape[-1]
        teacher_hidden = TeacherTopK(batch.teacher_top_ids.reshape(-1, k), batch.teacher_top_logprobs.reshape(-1, k),
                                     batch.teacher_tail_logmass.reshape(-1))
    elif config.needs_teacher:
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        mask = tree_attention_mask(batch.teacher_branch, batch.teacher_attach, batch.teacher_valid)
        t_hidden = teacher.hidden_states(batch.teacher_ids, batch.teacher_positions, attention_mask=mask)
        teacher_hidden = jax.lax.stop_gradient(_gather(t_hidden, batch.teacher_loss_index))
        teacher_unembed = jax.lax.stop_gradient(teacher.unembedding())

    targets = batch.targets.reshape(-1)
    weights = batch.weights.reshape(-1)
    sequence_ids = jnp.broadcast_to(jnp.arange(rows)[:, None], batch.targets.shape).reshape(-1)
    # Σ weights · loss is the numerator of both reductions (sequences without loss tokens have
    # weight 0), so its gradient, scaled once by the batch's count, is the loss's gradient.
    total, per_token = chunked_weighted_loss(student_hidden, student_unembed, teacher_hidden, teacher_unembed,
                                             targets, weights, spec, chunk_size=config.chunk_size)
    _, sums = reduce_losses(per_token, weights, sequence_ids, rows, config.reduction)
    if config.tracks_kl:
        kl_spec = Divergence("forward_kl", temperature=spec.temperature)
        kl_tokens = chunked_token_losses(jax.lax.stop_gradient(student_hidden), jax.lax.stop_gradient(student_unembed),
                                         teacher_hidden, teacher_unembed, targets, kl_spec, chunk_size=config.chunk_size)
        _, kl_sums = reduce_losses(kl_tokens, weights, sequence_ids, rows, "token_mean")
    elif config.kl_is_loss:  # the per-token loss is the KL; report it token-averaged
        kl_sums = LossSums(total=jnp.sum(per_token * weights), count=jnp.sum(weights))
    else:
        kl_sums = _ZERO_SUMS
    return total, (sums, kl_sums)


def _split_micro_batches(batch: DistillBatch, micro_batches: int) -> DistillBatch:
    """[rows, ...] -> [micro_batches, rows // micro_batches, ...], micro-batch i = rows i, i + m, i + 2m, ...

    Strided, not contiguous: the batch is sharded by rows, so each device holds a contiguous block
    and gives every micro-batch its share of rows, and the scan slices micro-batches without moving
    data. (Contiguous micro-batches would each live on one device: the compiler then gathers the
    whole batch onto every device.) The loss is normalized by the whole batch, so which rows share
    a micro-batch does not change the step's result beyond floating-point summation order."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % micro_batches:
        raise ValueError(f"a batch of {rows} rows does not split into {micro_batches} micro-batches")
    return jax.tree.map(lambda x: x.reshape((rows // micro_batches, micro_batches) + x.shape[1:]).swapaxes(0, 1),
                        batch)


def _accumulate(params, teacher_params, batch, *, graphdef, teacher_graphdef, config, with_grad: bool):
    """Scans the micro-batches; returns (summed fp32 grads or None, loss sums, kl sums)."""
    def one(mb):
        loss_fn = lambda p: _micro_losses(p, teacher_params, mb, graphdef=graphdef,  # noqa: E731
                                          teacher_graphdef=teacher_graphdef, config=config)
        if not with_grad:
            return (None, *loss_fn(params)[1])
        (_, (sums, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), sums, kl

    if config.micro_batches == 1:  # no accumulator: one set of gradients fewer in memory
        return one(batch)

    def body(carry, mb):
        grads, sums, kl = one(mb)
        acc_grads, acc_sums, acc_kl = carry
        if with_grad:
            grads = jax.tree.map(jnp.add, acc_grads, grads)
        return (grads, acc_sums + sums, acc_kl + kl), None

    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params) if with_grad else None
    micro = _split_micro_batches(batch, config.micro_batches)
    (grads, loss_sums, kl_sums), _ = jax.lax.scan(body, (zero_grads, _ZERO_SUMS, _ZERO_SUMS), micro)
    return grads, loss_sums, kl_sums


def _metrics(loss_sums: LossSums, kl_sums: LossSums, batch: DistillBatch, config: StepConfig) -> Metrics:
    weights = batch.weights
    metrics = {
        "loss": loss_sums.mean(),
        "loss_total": loss_sums.total,
        "loss_count": loss_sums.count,
        "tokens": jnp.sum(weights),
        "student_tokens": jnp.sum(batch.student_valid).astype(jnp.float32),
        "sequences": jnp.sum(jnp.any(weights > 0, axis=1)).astype(jnp.float32),
    }
    if config.kl_is_loss or config.tracks_kl:
        metrics["kl"] = kl_sums.mean()
    return metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: StepConfig,
    *,
    teacher_graphdef: nnx.GraphDef | None = None,
) -> Callable[[TrainState, nnx.State, DistillBatch], tuple[TrainState, Metrics]]:
    """The jitted training step (state donated). ``teacher_graphdef`` defaults to the student's;
    ``teacher_params`` may be None when the step does not need the teacher (``config.needs_teacher``)."""
    teacher_graphdef = teacher_graphdef or graphdef

    def step(state: TrainState, teacher_params: nnx.State | None, batch: DistillBatch) -> tuple[TrainState, Metrics]:
        grads, loss_sums, kl_sums = _accumulate(state.params, teacher_params, batch, graphdef=graphdef,
                                                teacher_graphdef=teacher_graphdef, config=config, with_grad=True)
        scale = 1.0 / jnp.maximum(loss_sums.count, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)  # float32, whatever the parameters' dtype
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = apply_updates(state.params, updates, opt_state)
        metrics = _metrics(loss_sums, kl_sums, batch, config)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, config: StepConfig, *, teacher_graphdef: nnx.GraphDef | None = None
                   ) -> Callable[[nnx.State, nnx.State, DistillBatch], Metrics]:
    """Loss and KL of ``params`` on a batch, no update (held-out evaluation)."""
    teacher_graphdef = teacher_graphdef or graphdef

    def evaluate(params: nnx.State, teacher_params: nnx.State | None, batch: DistillBatch) -> Metrics:
        _, loss_sums, kl_sums = _accumulate(params, teacher_params, batch, graphdef=graphdef,
                                            teacher_graphdef=teacher_graphdef, config=config, with_grad=False)
        return _metrics(loss_sums, kl_sums, batch, config)

    return jax.jit(evaluate)
