"""Pure array functions behind the Qwen3 layers: RMSNorm, RoPE, grouped-query attention, the SwiGLU MLP.

No parameters live here; every function maps arrays to arrays and is safe under ``jit``,
``scan`` and ``checkpoint``. Precision contract (matches Hugging Face Qwen3 in fp32):
normalization statistics, rotary angles and the attention softmax are computed in fp32 whatever
the compute dtype; matmuls run in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

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
# use the dense path. With heads-major tiles, 256 was the fastest of 128/256/512 for forward +
# backward on a 2-core CPU at 1,024 and 4,096 tokens; accelerators, which run the tile loop
# sequentially, may want larger tiles (not yet measured).
ATTENTION_BLOCK = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """An attention mask ``[B, T, S]`` cut into ``block x block`` tiles, for :func:`blocked_attention`.

    Built once per forward pass by :func:`block_mask` (every layer shares it). ``kv_order[i]``
    lists query block i's key blocks with any allowed pair first (ascending), ``kv_count[i]`` how
    many there are; ``q_order`` / ``q_count`` the same per key block. A tile counts as active if
    any row of the batch may attend within it, so the loops visit exactly the active tiles.
    """

    tiles: jax.Array  # bool [nq, nk, B, block, block]
    kv_order: jax.Array  # int32 [nq, nk]
    kv_count: jax.Array  # int32 [nq]
    q_order: jax.Array  # int32 [nk, nq]
    q_count: jax.Array  # int32 [nk]
    q_len: int = dataclasses.field(metadata=dict(static=True))
    kv_len: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(metadata=dict(static=True))


def block_mask(mask: jax.Array, block: int | None = None) -> BlockMask:
    """The :class:`BlockMask` of a boolean ``[B, T, S]`` mask (True = may attend)."""
    block = block or ATTENTION_BLOCK
    batch, q_len, kv_len = mask.shape
    nq, nk = -(-q_len // block), -(-kv_len // block)
    padded = jnp.pad(mask.astype(bool), [(0, 0), (0, nq * block - q_len), (0, nk * block - kv_len)])
    tiles = padded.reshape(batch, nq, block, nk, block).transpose(1, 3, 0, 2, 4)
    active = jnp.any(tiles, axis=(2, 3, 4))  # [nq, nk]

    def active_first(rows):  # stable: the active indices in ascending order, then the rest
        return jnp.argsort(~rows, axis=1, stable=True).astype(jnp.int32), jnp.sum(rows, axis=1, dtype=jnp.int32)

    kv_order, kv_count = active_first(active)
    q_order, q_count = active_first(active.T)
    return BlockMask(tiles, kv_order, kv_count, q_order, q_count, q_len, kv_len, block)


def prepare_mask(mask: jax.Array, q_len: int, block: int | None = None) -> jax.Array | BlockMask:
    """What :func:`attention` should get for ``q_len`` queries: the mask itself when they fit in one
    block (decode steps, short inputs: the dense path), else its :class:`BlockMask` with ``block``
    tiles (default ``ATTENTION_BLOCK``). Build it once outside the layer loop so that every layer
    reuses the tiles."""
    block = block or ATTENTION_BLOCK
    return block_mask(mask, block) if q_len > block else mask


# Score elements of one tile (all rows and heads) that the sampler's prefill aims for. A tile is
# [B, K, G, block, block] fp32 over the whole batch: on a 2-core CPU, prefilling 8 rows x 512
# tokens of a 4-head model ran fastest with 64-token tiles (1/2 MiB of scores), where the 256
# that suits the training step (2 rows, 8 heads) was ~2.5x slower; 128 was in between.
EXTEND_TILE_ELEMENTS = 2**18


def extend_block(batch: int, num_heads: int) -> int:
    """The blocked attention's tile for extending a KV cache by ``batch`` rows of ``num_heads``
    heads: the largest power of two up to ``ATTENTION_BLOCK`` whose tile holds at most
    ``EXTEND_TILE_ELEMENTS`` scores, and at least 64."""
    block = ATTENTION_BLOCK
    while block > 64 and batch * num_heads * block * block > EXTEND_TILE_ELEMENTS:
        block //= 2
    return block


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | BlockMask, *,
              kv_heads_first: bool = False) -> jax.Array:
    """Grouped-query attention.

    q [B, T, H, D], k and v [B, S, K, D] (or [B, K, S, D] with ``kv_heads_first``, the KV cache's
    layout) with H a multiple of K, mask [B, T, S] (True = may attend) or its :class:`BlockMask`.
    Returns [B, T, H, D] in q's dtype. Scores and softmax in fp32.

    A :class:`BlockMask`, or a dense mask with more than ``ATTENTION_BLOCK`` queries, goes through
    :func:`blocked_attention` (no ``[T, S]`` score matrix, masked-out tiles skipped); otherwise
    :func:`dense_attention`. Both give the same result at every query that may attend to
    something; a query that may attend to nothing (padding) gets an arbitrary finite output.
    """
    if isinstance(mask, BlockMask) or q.shape[1] > ATTENTION_BLOCK:
        return blocked_attention(q, k, v, mask if isinstance(mask, BlockMask) else block_mask(mask),
                                 kv_heads_first=kv_heads_first)
    return dense_attention(q, k, v, mask, kv_heads_first=kv_heads_first)


def _check_heads(q: jax.Array, k: jax.Array, kv_heads_axis: int = 2) -> None:
    if q.shape[2] % k.shape[kv_heads_axis]:
        raise ValueError(f"attention: {q.shape[2]} query heads is not a multiple of "
                         f"{k.shape[kv_heads_axis]} key/value heads")


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                    kv_heads_first: bool = False) -> jax.Array:
    """:func:`attention` with the whole ``[B, K, G, T, S]`` score tensor materialized.

    A query with nothing to attend to gets the mean of all values (see ``MASK_VALUE``).
    """
    _check_heads(q, k, 1 if kv_heads_first else 2)
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k.shape[1 if kv_heads_first else 2]
    group = num_heads // num_kv
    kv = "bksd" if kv_heads_first else "bskd"
    q = q.reshape(batch, q_len, num_kv, group, head_dim)
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Heads-major output: one plain [G*T, S] x [S, D] product per (batch, kv head); asking the
    # einsum for [B, T, K, G, D] directly makes XLA:CPU pick a slow strided matmul.
    out = jnp.einsum(f"bkgts,{kv}->bkgtd", probs, v).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask, *,
                      kv_heads_first: bool = False) -> jax.Array:
    """:func:`attention` computed tile by tile (FlashAttention-2's algorithm, in plain JAX).

    For each query block a loop visits only its active key blocks (``mask.kv_order``), so a
    causal mask costs about half of the dense work and a step-wise tree mask (branches that see
    only their own trunk prefix) far less. An online softmax keeps a running max, normalizer and
    weighted sum per query; one tile's scores are the largest temporary, so memory is O(T)
    instead of O(T * S). The backward pass (``custom_vjp``) keeps only the output and the
    log-normalizer, and for each key block recomputes the probabilities of its active tiles.

    Blocks are laid out heads-major once, before the loops (queries ``[B, K, G, bq, D]``, keys
    and values ``[B, K, bk, D]``), so every tile product is a plain batched matmul over
    ``(B, K)`` and no tile is transposed inside a loop. ``kv_heads_first``: k and v are
    [B, K, S, D] (the KV cache's layout), cut into blocks without a transpose.

    A query with nothing to attend to gets 0 (no NaN in values or gradients).
    """
    kv_seq_axis, kv_heads_axis = (2, 1) if kv_heads_first else (1, 2)
    _check_heads(q, k, kv_heads_axis)
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[kv_seq_axis], k.shape[kv_heads_axis]
    if (mask.q_len, mask.kv_len) != (q_len, kv_len) or mask.tiles.shape[2] != batch:
        raise ValueError(f"attention: the BlockMask is for [{mask.tiles.shape[2]}, {mask.q_len}, {mask.kv_len}]; "
                         f"q and k need [{batch}, {q_len}, {kv_len}]")
    block, nq, nk = mask.block, mask.tiles.shape[0], mask.tiles.shape[1]
    group = num_heads // num_kv

    def blocks(x, seq_axis, n):  # sequence at seq_axis -> [n, B, K, ..., block, D], zero-padded
        padding = [(0, 0)] * x.ndim
        padding[seq_axis] = (0, n * block - x.shape[seq_axis])
        x = jnp.pad(x, padding)
        x = x.reshape(x.shape[:seq_axis] + (n, block) + x.shape[seq_axis + 1:])
        return jnp.moveaxis(x, (seq_axis, seq_axis + 1), (0, x.ndim - 2))

    qb = blocks(q.reshape(batch, q_len, num_kv, group, head_dim), 1, nq)  # [nq, B, K, G, bq, D]
    kb, vb = blocks(k, kv_seq_axis, nk), blocks(v, kv_seq_axis, nk)  # [nk, B, K, bk, D]
    out = _flash(qb, kb, vb, mask)  # [nq, B, K, G, bq, D]
    out = jnp.moveaxis(out, (0, 4), (1, 2)).reshape(batch, nq * block, num_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)


def _tile_scores(qi: jax.Array, kj: jax.Array) -> jax.Array:
    """[B, K, G, bq, D] x [B, K, bk, D] -> fp32 scores [B, K, G, bq, bk], scaled."""
    scores = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32)
    return scores * (qi.shape[-1] ** -0.5)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    return lax.dynamic_index_in_dim(x, index, axis=0, keepdims=False)


def _flash_forward(qb, kb, vb, mask: BlockMask):
    """Output [nq, B, K, G, bq, D] (fp32) and log-normalizer [nq, B, K, G, bq] of the blocked attention."""

    def query_block(inputs):
        qi, tiles, order, count = inputs  # [B, K, G, bq, D], [nk, B, bq, bk], [nk], []
        stats = qi.shape[:-1]  # [B, K, G, bq]

        def key_block(n, carry):
            running_max, normalizer, acc = carry
            j = order[n]
            vj = _take(vb, j)
            allowed = _take(tiles, j)[:, None, None]
            scores = jnp.where(allowed, _tile_scores(qi, _take(kb, j)), MASK_VALUE)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
            probs = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
            correction = jnp.exp(running_max - new_max)
            normalizer = normalizer * correction + jnp.sum(probs, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bksd->bkgqd", probs.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
            return new_max, normalizer, acc

        init = (jnp.full(stats, MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        running_max, normalizer, acc = lax.fori_loop(0, count, key_block, init)
        seen = normalizer > 0.0
        out = acc / jnp.where(seen, normalizer, 1.0)[..., None]
        log_normalizer = jnp.where(seen, running_max + jnp.log(jnp.where(seen, normalizer, 1.0)), 0.0)
        return out, log_normalizer  # [B, K, G, bq, D], [B, K, G, bq]

    return lax.map(query_block, (qb, mask.tiles, mask.kv_order, mask.kv_count))


@jax.custom_vjp
def _flash(qb, kb, vb, mask):
    return _flash_forward(qb, kb, vb, mask)[0]


def _flash_fwd(qb, kb, vb, mask):
    out, log_normalizer = _flash_forward(qb, kb, vb, mask)
    return out, (qb, kb, vb, mask, out, log_normalizer)


def _flash_bwd(residuals, out_grad):
    qb, kb, vb, mask, out, log_normalizer = residuals
    # delta_i = Σ_d dO_i · O_i: the softmax-backward term shared by a query's whole row.
    delta = jnp.sum(out_grad * out, axis=-1)  # [nq, B, K, G, bq]
    out_grad = out_grad.astype(vb.dtype)
    scale = qb.shape[-1] ** -0.5

    def key_block(q_grad, inputs):
        kj, vj, j, order, count = inputs

        def query_block(n, carry):
            q_grad, k_grad, v_grad = carry
            i = order[n]
            qi, gi = _take(qb, i), _take(out_grad, i)
            allowed = _take(_take(mask.tiles, i), j)[:, None, None]
            probs = jnp.where(allowed, jnp.exp(_tile_scores(qi, kj) - _take(log_normalizer, i)[..., None]), 0.0)
            v_grad = v_grad + jnp.einsum("bkgqs,bkgqd->bksd", probs.astype(gi.dtype), gi,
                                         preferred_element_type=jnp.float32)
            dprobs = jnp.einsum("bkgqd,bksd->bkgqs", gi, vj, preferred_element_type=jnp.float32)
            dscores = (probs * (dprobs - _take(delta, i)[..., None]) * scale).astype(qi.dtype)
            k_grad = k_grad + jnp.einsum("bkgqs,bkgqd->bksd", dscores, qi, preferred_element_type=jnp.float32)
            dq = jnp.einsum("bkgqs,bksd->bkgqd", dscores, kj, preferred_element_type=jnp.float32)
            q_grad = lax.dynamic_update_index_in_dim(q_grad, _take(q_grad, i) + dq, i, axis=0)
            return q_grad, k_grad, v_grad

        init = (q_grad, jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
        q_grad, k_grad, v_grad = lax.fori_loop(0, count, query_block, init)
        return q_grad, (k_grad, v_grad)

    q_grad, (k_grad, v_grad) = lax.scan(
        key_block, jnp.zeros(qb.shape, jnp.float32),
        (kb, vb, jnp.arange(kb.shape[0]), mask.q_order, mask.q_count))
    return q_grad.astype(qb.dtype), k_grad.astype(kb.dtype), v_grad.astype(vb.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """The SwiGLU gate ``silu(gate) * up`` on the two MLP projections [..., F], in their dtype."""
    return jax.nn.silu(gate) * up


def _identity(x: jax.Array) -> jax.Array:
    return x


def swiglu_mlp(h: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
               constrain_hidden: Callable[[jax.Array], jax.Array] = _identity) -> jax.Array:
    """The Qwen3 MLP ``swiglu(h @ w_gate, h @ w_up) @ w_down``: h [..., E], gate/up [E, F], down [F, E].

    ``constrain_hidden`` is applied to the [..., F] projections and to their gradients (the
    caller's sharding constraint). The backward is written by hand: autodiff's weight gradients
    contract over tokens with the gate's cotangent laid out [F, tokens], which XLA:CPU builds with
    a strided transposing copy per projection (a third of the MLP backward on a 2-core CPU); here
    every weight gradient is ``tokens x E`` contracted with ``tokens x F`` on its leading axis,
    a layout the dot kernels take as is. The elementwise gate math runs in fp32.
    """
    return _swiglu_mlp(h, w_gate, w_up, w_down, constrain_hidden)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _swiglu_mlp(h, w_gate, w_up, w_down, constrain_hidden):
    return _swiglu_mlp_fwd(h, w_gate, w_up, w_down, constrain_hidden)[0]


def _swiglu_mlp_fwd(h, w_gate, w_up, w_down, constrain_hidden):
    gate = constrain_hidden(h @ w_gate)
    up = constrain_hidden(h @ w_up)
    return swiglu(gate, up) @ w_down, (h, gate, up, w_gate, w_up, w_down)


def _contract_tokens(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a [..., M]``, ``b [..., N]`` -> ``[M, N]`` summed over every leading (token) axis."""
    return lax.dot_general(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), (((0,), (0,)), ((), ())))


def _swiglu_mlp_bwd(constrain_hidden, residuals, out_grad):
    h, gate, up, w_gate, w_up, w_down = residuals
    g32, u32 = gate.astype(jnp.float32), up.astype(jnp.float32)
    sig = jax.nn.sigmoid(g32)
    silu = g32 * sig
    hidden_grad = (out_grad @ w_down.T).astype(jnp.float32)
    up_grad = constrain_hidden((hidden_grad * silu).astype(up.dtype))
    gate_grad = constrain_hidden((hidden_grad * u32 * sig * (1.0 + g32 * (1.0 - sig))).astype(gate.dtype))
    down_grad = _contract_tokens((silu * u32).astype(out_grad.dtype), out_grad)
    h_grad = gate_grad @ w_gate.T + up_grad @ w_up.T
    return (h_grad.astype(h.dtype), _contract_tokens(h, gate_grad).astype(w_gate.dtype),
            _contract_tokens(h, up_grad).astype(w_up.dtype), down_grad.astype(w_down.dtype))


_swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


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
