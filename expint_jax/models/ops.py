"""Pure array functions behind the Qwen3 layers: RMSNorm, RoPE, grouped-query attention, SwiGLU.

No parameters live here; every function maps arrays to arrays and is safe under ``jit``,
``scan`` and ``checkpoint``. Precision contract (matches Hugging Face Qwen3 in fp32):
normalization statistics, rotary angles and the attention softmax are computed in fp32 whatever
the compute dtype; matmuls run in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q [B, T, H, D], k and v [B, S, K, D] with H a multiple of K, mask [B, T, S] (True = may attend).
    Returns [B, T, H, D] in q's dtype. Scores and softmax in fp32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    if num_heads % num_kv:
        raise ValueError(f"attention: {num_heads} query heads is not a multiple of {num_kv} key/value heads")
    group = num_heads // num_kv
    q = q.reshape(batch, q_len, num_kv, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


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
