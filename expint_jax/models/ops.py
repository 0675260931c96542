"""Pure array functions behind the Qwen3 layers: RMSNorm, RoPE, grouped-query attention, SwiGLU.

No parameters live here; every function maps arrays to arrays and is safe under ``jit``,
``scan`` and ``checkpoint``. Precision contract (matches Hugging Face Qwen3 in fp32):
normalization statistics, rotary angles and the attention softmax are computed in fp32 whatever
the compute dtype; matmuls run in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Masked scores use a large finite value, not -inf: a query row with nothing to attend to (a
# padding token) then gets a uniform distribution instead of NaNs that would poison gradients.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``scale * x / rms(x)`` over the last axis, statistics in fp32, result in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies ``theta ** (-2i / head_dim)``, i < head_dim / 2, in fp32."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponents)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the "rotate half" layout used by Qwen: x [B, T, N, D], positions [B, T]."""
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = head_dim // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# Query/key block of the blocked attention (read at trace time); queries no longer than one block
# use the dense path. 128 was the fastest of 64/128/256/512 for forward + backward on a 2-core CPU.
ATTENTION_BLOCK = 128


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, block: int | None = None) -> jax.Array:
    """Grouped-query attention.

    q [B, T, H, D], k and v [B, S, K, D] with H a multiple of K, mask [B, T, S] (True = may attend).
    Returns [B, T, H, D] in q's dtype. Scores and softmax in fp32.

    Queries longer than ``block`` go through :func:`blocked_attention` (no ``[T, S]`` score
    matrix, masked-out blocks skipped); shorter ones (decode steps, tiny inputs) through
    :func:`dense_attention`. Both give the same result at every query that may attend to
    something; a query that may attend to nothing (padding) gets an arbitrary finite output.
    """
    _check_heads(q, k)
    block = block or ATTENTION_BLOCK
    if q.shape[1] > block:
        return blocked_attention(q, k, v, mask, block=block)
    return dense_attention(q, k, v, mask)


def _check_heads(q: jax.Array, k: jax.Array) -> None:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads is not a multiple of {k.shape[2]} key/value heads")


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """:func:`attention` with the whole ``[B, K, G, T, S]`` score tensor materialized.

    A query with nothing to attend to gets the mean of all values (see ``MASK_VALUE``).
    """
    _check_heads(q, k)
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    group = num_heads // num_kv
    q = q.reshape(batch, q_len, num_kv, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                      block: int = ATTENTION_BLOCK) -> jax.Array:
    """:func:`attention` computed block by block (FlashAttention-2's algorithm, in plain JAX).

    Queries and keys are cut into blocks of ``block`` tokens; a (query block, key block) pair
    whose mask is False for every row of the batch is skipped at run time (``lax.cond``), so a
    causal mask costs about half of the dense work and a step-wise tree mask (branches that see
    only their own trunk prefix) far less. Per query block an online softmax keeps a running
    max, normalizer and weighted sum; the scores of one block pair are the largest temporary,
    so memory is O(T) instead of O(T * S). The backward pass (``custom_vjp``) keeps only the
    output and the log-normalizer and recomputes each block's probabilities.

    A query with nothing to attend to gets 0 (no NaN in values or gradients).
    """
    _check_heads(q, k)
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    if mask.shape != (batch, q_len, kv_len):
        raise ValueError(f"attention: mask has shape {mask.shape}; expected {(batch, q_len, kv_len)}")
    nq, nk = -(-q_len // block), -(-kv_len // block)
    group = num_heads // num_kv

    def blocks(x, length, n):  # [B, L, ...] -> [n, B, block, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, n * block - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((batch, n, block) + x.shape[2:]), 1, 0)

    qb = blocks(q.reshape(batch, q_len, num_kv, group, head_dim), q_len, nq)
    kb, vb = blocks(k, kv_len, nk), blocks(v, kv_len, nk)
    padded = jnp.pad(mask, [(0, 0), (0, nq * block - q_len), (0, nk * block - kv_len)])
    mb = padded.reshape(batch, nq, block, nk, block).transpose(1, 3, 0, 2, 4)  # [nq, nk, B, bq, bk]
    active = jnp.any(mb, axis=(2, 3, 4))  # [nq, nk]
    out = _flash(qb, kb, vb, mb, active)  # [nq, B, bq, K, G, D]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, nq * block, num_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)


def _block_scores(qi: jax.Array, kj: jax.Array) -> jax.Array:
    """[B, bq, K, G, D] x [B, bk, K, D] -> fp32 scores [B, K, G, bq, bk], scaled."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32)
    return scores * (qi.shape[-1] ** -0.5)


def _flash_forward(qb, kb, vb, mb, active):
    """Output [nq, B, bq, K, G, D] (fp32) and log-normalizer [nq, B, K, G, bq] of the blocked attention."""

    def query_block(inputs):
        qi, mi, ai = inputs  # [B, bq, K, G, D], [nk, B, bq, bk], [nk]
        stats = qi.shape[:1] + qi.shape[2:4] + qi.shape[1:2]  # [B, K, G, bq]

        def key_block(carry, inputs):
            kj, vj, mij, aij = inputs

            def update(carry):
                running_max, normalizer, acc = carry
                allowed = mij[:, None, None]
                scores = jnp.where(allowed, _block_scores(qi, kj), MASK_VALUE)
                new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
                probs = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
                correction = jnp.exp(running_max - new_max)
                normalizer = normalizer * correction + jnp.sum(probs, axis=-1)
                acc = acc * correction[..., None] + jnp.einsum(
                    "bkgqs,bskd->bkgqd", probs.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return new_max, normalizer, acc

            return lax.cond(aij, update, lambda c: c, carry), None

        init = (jnp.full(stats, MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros(stats + qi.shape[-1:], jnp.float32))
        (running_max, normalizer, acc), _ = lax.scan(key_block, init, (kb, vb, mi, ai))
        seen = normalizer > 0.0
        out = acc / jnp.where(seen, normalizer, 1.0)[..., None]
        log_normalizer = jnp.where(seen, running_max + jnp.log(jnp.where(seen, normalizer, 1.0)), 0.0)
        return jnp.moveaxis(out, 3, 1), log_normalizer  # [B, bq, K, G, D], [B, K, G, bq]

    return lax.map(query_block, (qb, mb, active))


@jax.custom_vjp
def _flash(qb, kb, vb, mb, active):
    return _flash_forward(qb, kb, vb, mb, active)[0]


def _flash_fwd(qb, kb, vb, mb, active):
    out, log_normalizer = _flash_forward(qb, kb, vb, mb, active)
    return out, (qb, kb, vb, mb, active, out, log_normalizer)


def _flash_bwd(residuals, out_grad):
    qb, kb, vb, mb, active, out, log_normalizer = residuals
    # delta_i = Σ_d dO_i · O_i: the softmax-backward term shared by a query's whole row.
    delta = jnp.moveaxis(jnp.sum(out_grad * out, axis=-1), 2, -1)  # [nq, B, K, G, bq]
    out_grad = out_grad.astype(vb.dtype)
    num_q = qb.shape[0]

    def key_block(q_grad, inputs):
        kj, vj, mj, aj = inputs  # mj [nq, B, bq, bk], aj [nq]

        def query_block(carry, inputs):
            q_grad, k_grad, v_grad = carry
            i, qi, gi, lse_i, delta_i, mij, aij = inputs

            def contributions(_):
                allowed = mij[:, None, None]
                probs = jnp.where(allowed, jnp.exp(_block_scores(qi, kj) - lse_i[..., None]), 0.0)
                dv = jnp.einsum("bkgqs,bqkgd->bskd", probs.astype(gi.dtype), gi, preferred_element_type=jnp.float32)
                dprobs = jnp.einsum("bqkgd,bskd->bkgqs", gi, vj, preferred_element_type=jnp.float32)
                dscores = (probs * (dprobs - delta_i[..., None]) * (qi.shape[-1] ** -0.5)).astype(qi.dtype)
                dq = jnp.einsum("bkgqs,bskd->bqkgd", dscores, kj, preferred_element_type=jnp.float32)
                dk = jnp.einsum("bkgqs,bqkgd->bskd", dscores, qi, preferred_element_type=jnp.float32)
                return dq, dk, dv

            def nothing(_):
                return (jnp.zeros(qi.shape, jnp.float32), jnp.zeros(kj.shape, jnp.float32),
                        jnp.zeros(vj.shape, jnp.float32))

            dq, dk, dv = lax.cond(aij, contributions, nothing, None)
            q_grad = lax.dynamic_update_index_in_dim(q_grad, q_grad[i] + dq, i, axis=0)
            return (q_grad, k_grad + dk, v_grad + dv), None

        init = (q_grad, jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
        (q_grad, k_grad, v_grad), _ = lax.scan(
            query_block, init, (jnp.arange(num_q), qb, out_grad, log_normalizer, delta, mj, aj))
        return q_grad, (k_grad, v_grad)

    q_grad, (k_grad, v_grad) = lax.scan(
        key_block, jnp.zeros(qb.shape, jnp.float32), (kb, vb, jnp.moveaxis(mb, 1, 0), active.T))
    return (q_grad.astype(qb.dtype), k_grad.astype(kb.dtype), v_grad.astype(vb.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """The SwiGLU gate ``silu(gate) * up`` on the two MLP projections [..., F], in their dtype.

    The projections stay with the caller, which constrains their sharding (``act_mlp``) before
    the gate and applies the down projection after it.
    """
    return jax.nn.silu(gate) * up


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array, causal: bool = True) -> jax.Array:
    """Attention mask [B, T, S] from segment ids (0 = padding; equal non-zero ids attend).

    Causality is by array index, which suits left padding and packed sequences: the caller's
    position ids only drive RoPE. With ``causal`` the query at index i sees keys at index <= i.
    """
    same = (q_segments[:, :, None] == kv_segments[:, None, :]) & (q_segments[:, :, None] != 0)
    if causal:
        t, s = q_segments.shape[1], kv_segments.shape[1]
        same = same & (jnp.arange(t)[:, None] + (s - t) >= jnp.arange(s)[None, :])
    return same
