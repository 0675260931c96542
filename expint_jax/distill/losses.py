"""Token-level divergences between a frozen teacher and a trainable student, memory-bounded.

Contract
--------
Context distillation compares a teacher (sees the experience text) with a student (does not)
at the positions the agent wrote. The caller gathers the hidden states at those positions;
this module projects them to the vocabulary chunk by chunk so that a ``[tokens, vocab]``
logits tensor never exists, in the forward or the backward pass.

* :class:`Divergence` names the loss (a hashable strategy object, usable as a jit static arg).
* :func:`token_divergence` is the pure per-token math on one chunk of logits.
* :func:`chunked_token_losses` projects hidden states to logits one chunk at a time (fp32 inside
  the chunk only) under ``lax.scan`` and returns per-token losses. Its ``custom_vjp`` keeps only
  the inputs; the backward pass recomputes each chunk's logits and differentiates
  :func:`token_divergence` on that chunk alone (first-order reverse mode only). Measured on CPU
  it is as fast as or faster than ``jax.checkpoint`` under ``lax.scan`` and needs less temp
  memory (benchmarks/bench_losses.py). Only the student gets gradients; the teacher is under
  ``stop_gradient``.
* :func:`reduce_losses` turns per-token losses into a scalar plus :class:`LossSums`, the
  ``(total, count)`` pair that aggregates exactly across micro-batches and hosts.

Conventions (p = teacher distribution, q = student distribution, y = the token written)
---------------------------------------------------------------------------------------
* ``forward_kl``: KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)  (mode-covering; off-policy regime).
* ``reverse_kl``: KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)  (mode-seeking; on-policy regime).
* ``jsd`` (generalized JSD, the convention of on-policy distillation / TRL's GKD): for
  0 < beta < 1, with M = beta·p + (1 − beta)·q formed in log space,
  loss = beta·KL(p ‖ M) + (1 − beta)·KL(q ‖ M). The endpoints are special-cased: beta == 0 is
  exactly ``forward_kl`` and beta == 1 exactly ``reverse_kl`` (the mixture formula would
  degenerate to 0 there).
* ``sampled``: single-sample on-policy estimator at y. Value: log q(y) − log p(y). Gradient
  w.r.t. the student: stop_grad(log q(y) − log p(y))·∇ log q(y), the score-function estimator
  of ∇ KL(q ‖ p) when y ~ q.
* ``topk``: take the teacher's top-k tokens; both sides get k + 1 buckets (those k tokens plus one
  tail bucket holding the remaining mass); loss = KL(p ‖ q) over the buckets. The tail's log mass
  is the log-sum-exp over the tokens outside the top k, which equals log(1 − Σ top-k) without
  the cancellation, so it is finite and accurate even when the tail is ~0. Requires k < vocab.
  The teacher side may also come as a :class:`TeacherTopK` (its distribution as the rollout
  recorded it: top ids, their log-probs, the tail's log mass, at temperature 1), in place of
  teacher hidden states with ``teacher_unembed=None``: the same buckets without the teacher's
  logits. A recorded k above ``top_k`` keeps the first ``top_k`` and folds the rest into the tail.
* ``nll``: −log q(y) (SFT); no teacher needed.
* Temperature T divides both sides' logits. The KL-type losses (forward_kl, reverse_kl, jsd,
  topk) are multiplied by T² (standard distillation scaling, keeps gradient magnitudes
  comparable across T); ``sampled`` and ``nll`` use T for the logits but are not rescaled.
* All math is fp32 whatever the input dtype; 0·log 0 = 0.
* ``targets`` must be valid token ids at every position, padding included (pad with any real id
  and give it weight 0): an out-of-range id yields NaN rather than a silently clamped loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jax import lax

DivergenceKind = Literal["forward_kl", "reverse_kl", "jsd", "sampled", "topk", "nll"]
Reduction = Literal["token_mean", "sequence_sum"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TeacherTopK:
    """The teacher's distribution at each token as its rollout recorded it (``expint_jax.token_signal``).

    ``ids`` [N, K] int32, ``logprobs`` [N, K] (descending) and ``tail_logmass`` [N]: the log mass
    outside those K ids. Unmodified distribution (temperature 1).
    """

    ids: jax.Array
    logprobs: jax.Array
    tail_logmass: jax.Array

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Which per-token loss to compute, with its hyper-parameters (see the module docstring)."""

    kind: DivergenceKind
    beta: float = 0.5
    top_k: int = 64
    temperature: float = 1.0

    def __post_init__(self) -> None:
        kinds = get_args(DivergenceKind)
        if self.kind not in kinds:
            raise ValueError(f"Divergence.kind must be one of {kinds}, got {self.kind!r}")
        if not 0.0 <= self.beta <= 1.0:  # also rejects NaN
            raise ValueError(f"Divergence.beta must lie in [0, 1], got {self.beta!r}")
        if not _is_positive_int(self.top_k):
            raise ValueError(f"Divergence.top_k must be an integer >= 1, got {self.top_k!r}")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"Divergence.temperature must be finite and > 0, got {self.temperature!r}")

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "nll"

    @property
    def resolved_kind(self) -> str:
        """The kind actually computed: jsd's endpoints are exactly forward / reverse KL."""
        if self.kind == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        return self.kind


def _is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array | TeacherTopK | None,
    targets: jax.Array,
    spec: Divergence,
) -> jax.Array:
    """Per-token loss ``[n]`` (fp32) from student/teacher logits ``[n, V]`` and targets ``[n]``.

    ``teacher_logits`` may be None only for ``nll``, and a ``TeacherTopK`` only for ``topk``. The
    teacher is frozen: no gradient reaches it.
    """
    _check_logits(student_logits, teacher_logits, targets, spec)
    temperature = spec.temperature
    student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    if spec.kind == "nll":
        return -_at_targets(student_logp, targets)
    if isinstance(teacher_logits, TeacherTopK):  # temperature 1, checked
        return _recorded_top_k_bucket_kl(student_logp, teacher_logits, spec.top_k)

    teacher_logp = lax.stop_gradient(
        jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    )
    kind = spec.resolved_kind
    if kind == "sampled":
        return _sampled_estimator(student_logp, teacher_logp, targets)
    if kind == "forward_kl":
        loss = _kl(teacher_logp, student_logp)
    elif kind == "reverse_kl":
        loss = _kl(student_logp, teacher_logp)
    elif kind == "jsd":
        loss = _interior_jsd(student_logp, teacher_logp, spec.beta)
    else:
        loss = _top_k_bucket_kl(student_logp, teacher_logp, spec.top_k)
    return loss * temperature**2


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p ‖ q) over the last axis; terms with p == 0 are exactly 0 (and so are their grads)."""
    positive = jnp.exp(log_p) > 0.0
    # Double `where`: a -inf log-probability must not leak NaN into the gradient of a masked term.
    safe_log_p = jnp.where(positive, log_p, 0.0)
    safe_log_q = jnp.where(positive, log_q, 0.0)
    terms = jnp.where(positive, jnp.exp(safe_log_p) * (safe_log_p - safe_log_q), 0.0)
    return jnp.sum(terms, axis=-1)


def _interior_jsd(student_logp: jax.Array, teacher_logp: jax.Array, beta: float) -> jax.Array:
    log_mixture = jnp.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * _kl(teacher_logp, log_mixture) + (1.0 - beta) * _kl(student_logp, log_mixture)


def _sampled_estimator(student_logp: jax.Array, teacher_logp: jax.Array, targets: jax.Array) -> jax.Array:
    student_at_y = _at_targets(student_logp, targets)
    log_ratio = lax.stop_gradient(student_at_y - _at_targets(teacher_logp, targets))
    # Forward value is log_ratio; backward sees only log_ratio · ∇ log q(y).
    surrogate = log_ratio * student_at_y
    return log_ratio + surrogate - lax.stop_gradient(surrogate)


def _top_k_bucket_kl(student_logp: jax.Array, teacher_logp: jax.Array, top_k: int) -> jax.Array:
    in_top, top_ids = _teacher_top_k(teacher_logp, top_k)

    def buckets(log_probs: jax.Array) -> jax.Array:
        top = jnp.take_along_axis(log_probs, top_ids, axis=-1)
        return jnp.concatenate([top, _tail_log_mass(log_probs, in_top)[:, None]], axis=-1)

    return _kl(buckets(teacher_logp), buckets(student_logp))


def _recorded_top_k_bucket_kl(student_logp: jax.Array, teacher: TeacherTopK, top_k: int) -> jax.Array:
    """``_top_k_bucket_kl`` with the teacher's buckets as its rollout recorded them."""
    ids = teacher.ids[:, :top_k]
    top = lax.stop_gradient(teacher.logprobs[:, :top_k].astype(jnp.float32))
    tail = lax.stop_gradient(teacher.tail_logmass.astype(jnp.float32))
    if teacher.k > top_k:  # the recorded ids beyond top_k belong to the tail bucket
        tail = jnp.logaddexp(tail, jax.nn.logsumexp(lax.stop_gradient(teacher.logprobs[:, top_k:]), axis=-1))
    rows = jnp.arange(student_logp.shape[0])[:, None]
    in_top = jnp.zeros(student_logp.shape, bool).at[rows, ids].set(True)
    student = jnp.concatenate([jnp.take_along_axis(student_logp, ids, axis=-1),
                               _tail_log_mass(student_logp, in_top)[:, None]], axis=-1)
    return _kl(jnp.concatenate([top, tail[:, None]], axis=-1), student)


def _teacher_top_k(teacher_logp: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Mask ``[n, V]`` of the teacher's top-k tokens per row, and their ids ``[n, k]``."""
    _, top_ids = lax.top_k(teacher_logp, int(top_k))
    rows = jnp.arange(teacher_logp.shape[0])[:, None]
    return jnp.zeros(teacher_logp.shape, bool).at[rows, top_ids].set(True), top_ids


def _tail_log_mass(log_probs: jax.Array, in_top: jax.Array) -> jax.Array:
    """log Σ_{v outside top-k} p_v = log(1 − Σ top-k), without the cancellation.

    Shifted by the largest log-probability outside the top k, so the sum is >= 1 and its log is
    finite however small the tail is.
    """
    outside = jnp.where(in_top, -jnp.inf, log_probs)
    peak = lax.stop_gradient(jnp.max(outside, axis=-1, keepdims=True))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    return peak[:, 0] + jnp.log(jnp.sum(jnp.exp(outside - peak), axis=-1))


def _at_targets(log_probs: jax.Array, targets: jax.Array) -> jax.Array:
    picked = jnp.take_along_axis(log_probs, targets[:, None], axis=-1, mode="fill", fill_value=jnp.nan)
    return picked[:, 0]


def _check_logits(student_logits, teacher_logits, targets, spec: Divergence) -> None:
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be [tokens, vocab], got shape {student_logits.shape}")
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"targets must be [tokens] = {student_logits.shape[:1]} to match student_logits "
            f"{student_logits.shape}, got shape {targets.shape}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if not spec.needs_teacher:
        return
    if teacher_logits is None:
        raise ValueError(f"Divergence kind {spec.kind!r} needs teacher_logits, got None")
    if isinstance(teacher_logits, TeacherTopK):
        _check_recorded(teacher_logits, student_logits.shape[0], spec)
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {teacher_logits.shape} != student_logits shape {student_logits.shape}"
        )
    _check_top_k(spec, student_logits.shape[-1])


def _check_recorded(teacher: TeacherTopK, num_tokens: int, spec: Divergence) -> None:
    """A recorded teacher distribution serves only ``topk`` at temperature 1, with k >= ``top_k``."""
    if spec.kind != "topk":
        raise ValueError(f"a recorded teacher distribution (top-k + tail) serves the 'topk' divergence only, "
                         f"not {spec.kind!r}")
    if spec.temperature != 1.0:
        raise ValueError(f"a recorded teacher distribution is at temperature 1; Divergence.temperature is "
                         f"{spec.temperature}")
    shapes = (teacher.ids.shape, teacher.logprobs.shape, teacher.tail_logmass.shape)
    if teacher.ids.ndim != 2 or shapes != ((num_tokens, teacher.k),) * 2 + ((num_tokens,),):
        raise ValueError(f"the recorded teacher distribution must be ids/logprobs [{num_tokens}, k] and tail "
                         f"[{num_tokens}], got shapes {shapes}")
    if teacher.k < spec.top_k:
        raise ValueError(f"the rollout recorded the teacher's top {teacher.k} tokens; Divergence.top_k="
                         f"{spec.top_k} needs at least that many (record with SamplingParams.top_logprobs >= "
                         f"{spec.top_k})")


def _check_top_k(spec: Divergence, vocab: int) -> None:
    if spec.kind == "topk" and spec.top_k >= vocab:
        raise ValueError(
            f"Divergence top_k={spec.top_k} must be < vocab size {vocab} (the tail bucket would be empty)"
        )


def chunked_token_losses(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array | None,
    teacher_unembed: jax.Array | None,
    targets: jax.Array,
    spec: Divergence,
    *,
    chunk_size: int = 1024,
) -> jax.Array:
    """Per-token losses ``[N]`` (fp32) from hidden states at the loss positions.

    ``student_hidden`` is ``[N, Ds]``, ``student_unembed`` ``[V, Ds]`` (vocab-major, like an HF
    ``lm_head.weight``); likewise ``teacher_hidden`` ``[N, Dt]`` / ``teacher_unembed`` ``[V, Dt]``
    (both None for ``nll``; ``teacher_hidden`` a ``TeacherTopK`` with ``teacher_unembed=None`` for a
    recorded teacher). Logits exist one ``[chunk_size, V]`` block at a time; the backward pass
    recomputes each block. Gradients flow to the student arrays only.
    """
    chunks = _checked_chunks(student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, spec,
                             chunk_size)
    if chunks is None:
        return jnp.zeros((0,), jnp.float32)
    student_chunks, teacher_chunks, teacher_unembed, target_chunks = chunks
    losses = _chunked_losses(spec, student_chunks, student_unembed, teacher_chunks, teacher_unembed, target_chunks)
    return losses.reshape(-1)[:student_hidden.shape[0]]


def chunked_weighted_loss(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array | None,
    teacher_unembed: jax.Array | None,
    targets: jax.Array,
    weights: jax.Array,
    spec: Divergence,
    *,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """``(Σ_i weights_i · loss_i, per-token losses [N])`` for a training step; arguments as in
    :func:`chunked_token_losses` plus ``weights`` ``[N]`` (0 at padding).

    Only the sum is differentiable (w.r.t. the student arrays); the per-token losses are for
    metrics. Because the weights are known before the backward pass, the forward pass of a
    differentiated call forms each chunk's logits once and computes that chunk's gradient right
    away (``hidden_grad`` ``[N, Ds]`` and the summed ``unembed_grad`` ``[V, Ds]`` are the
    residuals); the backward pass only scales them by the cotangent. That saves recomputing
    both sides' logits, a third of the vocabulary-projection work of :func:`chunked_token_losses`.
    Called without differentiation it computes the losses only.
    """
    if weights.shape != targets.shape:
        raise ValueError(f"weights must be [N] like targets {targets.shape}, got shape {weights.shape}")
    chunks = _checked_chunks(student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, spec,
                             chunk_size, weights.astype(jnp.float32))
    if chunks is None:
        return jnp.zeros((), jnp.float32), jnp.zeros((0,), jnp.float32)
    student_chunks, teacher_chunks, teacher_unembed, target_chunks, weight_chunks = chunks
    total, losses = _weighted_loss(spec, student_chunks, student_unembed, teacher_chunks, teacher_unembed,
                                   target_chunks, weight_chunks)
    return total, losses.reshape(-1)[:student_hidden.shape[0]]


def _checked_chunks(student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, spec, chunk_size,
                    *per_token):
    """Validated inputs of the chunked losses, split into chunks: ``(student chunks, teacher chunks,
    teacher unembedding, target chunks, *per_token chunks)``, the teacher's parts None when the
    divergence needs no teacher; None when there are no tokens."""
    _check_hidden(student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, spec, chunk_size)
    if student_hidden.shape[0] == 0:
        return None
    if not spec.needs_teacher:
        teacher_hidden = teacher_unembed = None
    student_chunks, teacher_chunks, *rest = _split_into_chunks(chunk_size, student_hidden, teacher_hidden, targets,
                                                               *per_token)
    return (student_chunks, teacher_chunks, teacher_unembed, *rest)


def _split_into_chunks(chunk_size: int, *arrays: jax.Array | None) -> list[jax.Array | None]:
    """Each array's leading axis N padded to a multiple of the chunk and split: ``[chunks, chunk, ...]``.

    Zero hidden rows, token id 0 and weight 0 give finite (uniform-logit) losses that are sliced
    off by the caller, and they get a zero cotangent, so padding changes no value or gradient.
    """
    num_tokens = arrays[0].shape[0]
    chunk = min(int(chunk_size), num_tokens)
    num_chunks = -(-num_tokens // chunk)
    padding = num_chunks * chunk - num_tokens

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, padding)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    # A recorded teacher (``TeacherTopK``) is split field by field.
    return [None if x is None else jax.tree.map(split, x) for x in arrays]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_losses(spec, student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets):
    """Losses ``[chunks, chunk]`` from hidden states split into chunks ``[chunks, chunk, D]``."""

    def step(carry, chunk_inputs):
        s_hidden, t_hidden, chunk_targets = chunk_inputs
        s_logits, t_logits = _chunk_logits(s_hidden, student_unembed, t_hidden, teacher_unembed)
        return carry, token_divergence(s_logits, t_logits, chunk_targets, spec)

    _, losses = lax.scan(step, None, (student_hidden, teacher_hidden, targets))
    return losses


def _chunked_losses_fwd(spec, student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets):
    losses = _chunked_losses(spec, student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets)
    # Only the inputs are kept; the backward pass recomputes each chunk's logits.
    return losses, (student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets)


def _chunked_losses_bwd(spec, residuals, loss_cotangent):
    student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets = residuals
    hidden_grad, unembed_grad, _ = _scan_student_grads(
        spec, student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, loss_cotangent)
    # The teacher is frozen and targets are integers: neither gets a cotangent.
    return hidden_grad, unembed_grad.astype(student_unembed.dtype), None, None, None


def _scan_student_grads(spec, student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, cotangent):
    """Per chunk: the logits once, the losses, and the student's gradient under ``cotangent``
    ``[chunks, chunk]``. Returns (hidden grads ``[chunks, chunk, Ds]``, unembedding grad ``[V, Ds]``
    in fp32, losses ``[chunks, chunk]``)."""
    # Logit gradients enter the matmuls in the student's own dtype (fp32 accumulation);
    # promoting to fp32 instead would copy the whole [V, D] unembedding per chunk.
    compute_dtype = jnp.result_type(student_hidden.dtype, student_unembed.dtype)

    def step(unembed_grad, chunk_inputs):
        s_hidden, t_hidden, chunk_targets, chunk_cotangent = chunk_inputs
        s_logits, t_logits = _chunk_logits(s_hidden, student_unembed, t_hidden, teacher_unembed)
        losses, logits_vjp = jax.vjp(
            lambda logits: token_divergence(logits, t_logits, chunk_targets, spec), s_logits
        )
        (logit_grad,) = logits_vjp(chunk_cotangent.astype(jnp.float32))
        logit_grad = logit_grad.astype(compute_dtype)
        hidden_grad = jnp.einsum("nv,vd->nd", logit_grad, student_unembed, preferred_element_type=jnp.float32)
        unembed_grad = unembed_grad + jnp.einsum(
            "nv,nd->vd", logit_grad, s_hidden, preferred_element_type=jnp.float32
        )
        return unembed_grad, (hidden_grad.astype(student_hidden.dtype), losses)

    unembed_grad, (hidden_grad, losses) = lax.scan(
        step,
        jnp.zeros(student_unembed.shape, jnp.float32),
        (student_hidden, teacher_hidden, targets, cotangent),
    )
    return hidden_grad, unembed_grad, losses


_chunked_losses.defvjp(_chunked_losses_fwd, _chunked_losses_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_loss(spec, student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, weights):
    """(Σ weights · losses, losses ``[chunks, chunk]``) from chunked inputs; no gradient work."""
    losses = _chunked_losses(spec, student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets)
    return jnp.sum(losses * weights), losses


def _weighted_loss_fwd(spec, student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, weights):
    hidden_grad, unembed_grad, losses = _scan_student_grads(
        spec, student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, weights)
    return (jnp.sum(losses * weights), losses), (hidden_grad, unembed_grad.astype(student_unembed.dtype))


def _weighted_loss_bwd(spec, residuals, cotangents):
    hidden_grad, unembed_grad = residuals
    total_cotangent, _ = cotangents  # the per-token losses are metrics: their cotangent is dropped
    scale = lambda g: (g * total_cotangent).astype(g.dtype)  # noqa: E731
    return scale(hidden_grad), scale(unembed_grad), None, None, None, None


_weighted_loss.defvjp(_weighted_loss_fwd, _weighted_loss_bwd)


def _chunk_logits(s_hidden, s_unembed, t_hidden, t_unembed) -> tuple[jax.Array, jax.Array | TeacherTopK | None]:
    s_logits = _project(s_hidden, s_unembed)
    if t_hidden is None or isinstance(t_hidden, TeacherTopK):  # no teacher, or its recorded buckets
        return s_logits, t_hidden
    return s_logits, lax.stop_gradient(_project(t_hidden, t_unembed))


def _project(hidden: jax.Array, unembed: jax.Array) -> jax.Array:
    return jnp.einsum("nd,vd->nv", hidden, unembed, preferred_element_type=jnp.float32)


def _check_hidden(
    student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, spec, chunk_size
):
    if not _is_positive_int(chunk_size):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    _check_matrix_pair("student", student_hidden, student_unembed)
    num_tokens, vocab = student_hidden.shape[0], student_unembed.shape[0]
    if targets.shape != (num_tokens,):
        raise ValueError(
            f"targets must be [N] = ({num_tokens},) like student_hidden, got shape {targets.shape}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    _check_top_k(spec, vocab)
    if not spec.needs_teacher:
        return
    if isinstance(teacher_hidden, TeacherTopK):
        if teacher_unembed is not None:
            raise ValueError("a recorded teacher (TeacherTopK) comes with teacher_unembed=None")
        _check_recorded(teacher_hidden, num_tokens, spec)
        return
    if teacher_hidden is None or teacher_unembed is None:
        raise ValueError(f"Divergence kind {spec.kind!r} needs teacher_hidden and teacher_unembed, got None")
    _check_matrix_pair("teacher", teacher_hidden, teacher_unembed)
    if teacher_hidden.shape[0] != num_tokens:
        raise ValueError(
            f"teacher_hidden has {teacher_hidden.shape[0]} tokens, student_hidden {num_tokens} "
            f"(shapes {teacher_hidden.shape} vs {student_hidden.shape})"
        )
    if teacher_unembed.shape[0] != vocab:
        raise ValueError(
            f"teacher_unembed vocab {teacher_unembed.shape[0]} != student_unembed vocab {vocab} "
            f"(shapes {teacher_unembed.shape} vs {student_unembed.shape})"
        )


def _check_matrix_pair(side: str, hidden, unembed) -> None:
    if hidden.ndim != 2 or unembed.ndim != 2:
        raise ValueError(
            f"{side}_hidden must be [N, D] and {side}_unembed [V, D], "
            f"got shapes {hidden.shape} and {unembed.shape}"
        )
    if hidden.shape[1] != unembed.shape[1]:
        raise ValueError(
            f"{side}_hidden width {hidden.shape[1]} != {side}_unembed width {unembed.shape[1]} "
            f"(shapes {hidden.shape} and {unembed.shape})"
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossSums:
    """Additive loss statistics: the mean over any set of micro-batches is Σ total / Σ count."""

    total: jax.Array
    count: jax.Array

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(total=self.total + other.total, count=self.count + other.count)

    def mean(self) -> jax.Array:
        return self.total / jnp.maximum(self.count, 1.0)


def reduce_losses(
    per_token: jax.Array,
    weights: jax.Array,
    sequence_ids: jax.Array,
    num_sequences: int,
    reduction: Reduction,
) -> tuple[jax.Array, LossSums]:
    """Scalar loss and its :class:`LossSums` from per-token losses ``[N]``.

    ``weights`` ``[N]`` is 0 at padding; ``sequence_ids`` ``[N]`` must lie in ``[0, num_sequences)``
    (ids outside are dropped by the segment sum).

    * ``token_mean``: Σ w·l / max(Σ w, 1); count = Σ w.
    * ``sequence_sum``: each sequence's Σ w·l, averaged over the sequences with at least one
      weighted token; count = the number of such sequences.
    """
    if per_token.ndim != 1 or weights.shape != per_token.shape or sequence_ids.shape != per_token.shape:
        raise ValueError(
            "per_token, weights and sequence_ids must all be [N]; got shapes "
            f"{per_token.shape}, {weights.shape} and {sequence_ids.shape}"
        )
    if not _is_positive_int(num_sequences):
        raise ValueError(f"num_sequences must be an integer >= 1, got {num_sequences!r}")
    weights = weights.astype(jnp.float32)
    weighted = per_token.astype(jnp.float32) * weights
    if reduction == "token_mean":
        sums = LossSums(total=jnp.sum(weighted), count=jnp.sum(weights))
    elif reduction == "sequence_sum":
        per_sequence = jax.ops.segment_sum(weighted, sequence_ids, num_segments=num_sequences)
        weight_per_sequence = jax.ops.segment_sum(weights, sequence_ids, num_segments=num_sequences)
        counted = weight_per_sequence > 0
        sums = LossSums(
            total=jnp.sum(jnp.where(counted, per_sequence, 0.0)),
            count=jnp.sum(counted).astype(jnp.float32),
        )
    else:
        raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {reduction!r}")
    return sums.mean(), sums
