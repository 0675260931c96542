"""Blocked (flash-style) attention equals the dense reference: values, gradients, masks, dtypes, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from expint_jax.distill.views import tree_attention_mask
from expint_jax.models import ops


def _qkv(rng, batch, q_len, kv_len, heads, kv_heads, dim, dtype=np.float32):
    q = rng.standard_normal((batch, q_len, heads, dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(dtype)
    v = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(dtype)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _causal_segments(segments):
    segments = jnp.asarray(segments, jnp.int32)
    return ops.segment_mask(segments, segments, causal=True)


def _tree_mask(rng, batch, length):
    """A step-wise layout: a trunk, then branches that each attach after some trunk token."""
    branch = np.zeros((batch, length), np.int32)
    attach = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    for row in range(batch):
        trunk = length // 2
        starts = np.sort(rng.choice(np.arange(trunk + 1, length), size=3, replace=False))
        for b, (start, end) in enumerate(zip(starts, [*starts[1:], length]), start=1):
            branch[row, start:end] = b
            attach[row, start:end] = rng.integers(1, trunk)
    valid = np.ones((batch, length), bool)
    valid[:, -2:] = False  # bucket padding
    return tree_attention_mask(jnp.asarray(branch), jnp.asarray(attach), jnp.asarray(valid)), valid


def _masks(rng, batch, length):
    causal = _causal_segments(np.ones((batch, length)))
    left_padded = np.ones((batch, length), np.int32)
    left_padded[0, : length // 3] = 0
    packed = np.concatenate([np.full(length // 2, 1), np.full(length - length // 2 - 3, 2), np.zeros(3)])
    tree, _ = _tree_mask(rng, batch, length)
    return {
        "causal": causal,
        "left_padded": _causal_segments(left_padded),
        "packed": _causal_segments(np.tile(packed, (batch, 1))),
        "tree": tree,
        "random": jnp.asarray(rng.random((batch, length, length)) < 0.3),
    }


def _attending_rows(mask):
    """[B, T] rows that may attend to something: the only rows where the two paths must agree."""
    return np.asarray(jnp.any(mask, axis=-1))


@pytest.mark.parametrize("mask_kind", ["causal", "left_padded", "packed", "tree", "random"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)])
def test_blocked_equals_dense_values_and_gradients(mask_kind, heads, kv_heads):
    rng = np.random.default_rng(0)
    length = 37  # not a multiple of the block
    q, k, v = _qkv(rng, 2, length, length, heads, kv_heads, 8)
    mask = _masks(rng, 2, length)[mask_kind]
    rows = _attending_rows(mask)
    out_weight = jnp.asarray(rng.standard_normal((2, length, heads, 8)).astype(np.float32) * rows[:, :, None, None])

    def loss(fn, q, k, v):  # only rows that attend to something carry a gradient
        return jnp.sum(fn(q, k, v, mask) * out_weight)

    dense = lambda q, k, v, m: ops.dense_attention(q, k, v, m)  # noqa: E731
    blocked = lambda q, k, v, m: ops.blocked_attention(q, k, v, ops.block_mask(m, 8))  # noqa: E731
    np.testing.assert_allclose(np.asarray(blocked(q, k, v, mask))[rows], np.asarray(dense(q, k, v, mask))[rows],
                               atol=2e-6, rtol=0)
    want = jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_rows_with_nothing_to_attend_get_zeros_and_finite_gradients():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 1, 20, 20, 2, 1, 4)
    mask = np.asarray(_causal_segments(np.ones((1, 20)))).copy()
    mask[0, 5] = False  # one query row that sees nothing
    mask[0, 16:] = False  # a whole block of such rows: no block of theirs is active
    out = ops.blocked_attention(q, k, v, ops.block_mask(jnp.asarray(mask), 4))
    np.testing.assert_array_equal(np.asarray(out)[0, [5, 16, 17, 18, 19]], 0.0)
    grads = jax.grad(lambda q, k, v: jnp.sum(ops.blocked_attention(q, k, v, ops.block_mask(jnp.asarray(mask), 4)) ** 2),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_cross_lengths_and_bf16():
    """Queries shorter than keys (a prefill into a longer cache) and bf16 inputs."""
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 2, 21, 30, 4, 2, 8)
    q_seg, kv_seg = jnp.ones((2, 21), jnp.int32), jnp.ones((2, 30), jnp.int32)
    mask = ops.segment_mask(q_seg, kv_seg, causal=True)
    np.testing.assert_allclose(np.asarray(ops.blocked_attention(q, k, v, ops.block_mask(mask, 8))),
                               np.asarray(ops.dense_attention(q, k, v, mask)), atol=2e-6, rtol=0)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = ops.blocked_attention(*bf, ops.block_mask(mask, 8))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ops.dense_attention(*bf, mask), np.float32),
                               atol=3e-2, rtol=0)


def test_attention_picks_the_path_by_query_length(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "blocked_attention", lambda q, k, v, m, **_: calls.append(m.block) or q)
    monkeypatch.setattr(ops, "ATTENTION_BLOCK", 8)
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 1, 9, 9, 2, 2, 4)
    mask = _causal_segments(np.ones((1, 9)))
    ops.attention(q, k, v, mask)
    ops.attention(q[:, :1], k, v, mask[:, :1])  # a decode step: dense
    assert calls == [8]
    assert isinstance(ops.prepare_mask(mask, 9), ops.BlockMask)
    one_query = mask[:, :1]
    assert ops.prepare_mask(one_query, 1) is one_query
    ops.attention(q, k, v, ops.block_mask(mask, 4))
    assert calls == [8, 4]


def test_block_mask_lists_the_active_tiles_first():
    mask = _causal_segments(np.ones((1, 10)))  # 3 x 3 tiles of 4, the last partly padding
    tiles = ops.block_mask(mask, 4)
    np.testing.assert_array_equal(tiles.kv_count, [1, 2, 3])
    np.testing.assert_array_equal(tiles.kv_order[:, 0], [0, 0, 0])
    np.testing.assert_array_equal(tiles.kv_order[2], [0, 1, 2])
    np.testing.assert_array_equal(tiles.q_count, [3, 2, 1])
    np.testing.assert_array_equal(tiles.q_order[1, :2], [1, 2])
    q = jnp.zeros((1, 10, 2, 4))
    with pytest.raises(ValueError, match=r"BlockMask is for \[1, 10, 10\]"):
        ops.blocked_attention(q[:, :9], q[:, :9, :1], q[:, :9, :1], tiles)


def test_blocked_skips_masked_blocks_and_keeps_memory_linear():
    """Compiled for a long causal sequence: no [T, S] buffer, and masked blocks run no math."""
    length, block = 2048, 128
    q = jnp.zeros((1, length, 2, 16))
    k = v = jnp.zeros((1, length, 1, 16))
    mask = _causal_segments(np.ones((1, length)))

    def temp_bytes(fn):
        grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    dense = temp_bytes(ops.dense_attention)
    blocked = temp_bytes(lambda q, k, v, m: ops.blocked_attention(q, k, v, ops.block_mask(m, block)))
    assert dense > 2 * length * length * 4  # at least the fp32 scores and probabilities
    assert blocked < dense / 8

    executed = []
    original = ops._tile_scores

    def counting(qi, kj):
        jax.debug.callback(lambda: executed.append(1))
        return original(qi, kj)

    ops._tile_scores = counting
    try:
        jax.block_until_ready(ops.blocked_attention(q[:, :512], k[:, :512], v[:, :512],
                                                    ops.block_mask(mask[:, :512, :512], block)))
    finally:
        ops._tile_scores = original
    assert len(executed) == 4 * 5 // 2  # the causal triangle of 4 x 4 blocks, diagonal included
