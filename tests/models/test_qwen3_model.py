"""Model behaviour beyond HF parity: sharding on a (2, 2, 2) mesh, KV-cache decoding, masks, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from expint_jax.models import ops
from expint_jax.models.config import DTypePolicy, tiny
from expint_jax.models.qwen3 import Qwen3
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from expint_jax.models.init import init_model
from expint_jax.parallel.placement import shard_model
from expint_jax.parallel.rules import DEFAULT_RULES, logical_to_spec

CONFIG = tiny(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
              tie_word_embeddings=False)


def _inputs(batch=4, steps=12, seed=0):
    ids = jax.random.randint(jax.random.key(seed), (batch, steps), 0, CONFIG.vocab_size)
    return ids, jnp.broadcast_to(jnp.arange(steps), (batch, steps))


def _forward(graphdef, state, ids, positions):
    return nnx.merge(graphdef, state)(ids, positions)


def test_sharded_forward_equals_single_device_and_params_are_sharded(attention_path):
    reference = Qwen3(CONFIG, rngs=nnx.Rngs(0))
    ids, positions = _inputs()
    want = reference(ids, positions)

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    mesh_shape = dict(mesh.shape)
    model = shard_model(Qwen3(CONFIG, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    checked = 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value, axes = variable.get_value(), variable.get_metadata()["logical_axes"]
        spec = logical_to_spec(axes, DEFAULT_RULES, mesh_shape, value.shape)
        assert value.sharding.spec == spec, (path, axes, value.sharding.spec, spec)
        blocks = [size // (mesh_shape[a] if isinstance(a, str) else 1) for size, a in zip(value.shape, spec)]
        assert value.addressable_shards[0].data.shape == tuple(blocks + list(value.shape[len(blocks):])), path
        checked += 1
    assert checked == len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 14
    # the table really shards this model: spot-check three by hand
    assert state["layers"]["q_proj"].get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    assert state["layers"]["down_proj"].get_value().sharding.spec == P(None, "tensor", "fsdp")
    assert state["embed"].get_value().sharding.spec == P("tensor", "fsdp")

    with jax.set_mesh(mesh):
        got = jax.jit(_forward, static_argnums=0)(graphdef, state, ids, positions)
        hidden = jax.jit(lambda g, s, i, p: nnx.merge(g, s).hidden_states(i, p), static_argnums=0)(graphdef, state, ids,
                                                                                                   positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    # activations follow the rules too: batch over data x fsdp, logits' vocabulary over tensor
    batch = ("data", "fsdp")
    assert logical_to_spec(("batch", "seq", "act_vocab"), DEFAULT_RULES, mesh_shape, got.shape) == P(batch, None, "tensor")
    assert got.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(batch, None, "tensor")), got.ndim)
    assert hidden.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(batch, None, None)), hidden.ndim)
    assert got.addressable_shards[0].data.shape == (ids.shape[0] // 4, ids.shape[1], CONFIG.vocab_size // 2)


def test_init_model_creates_sharded_parameters_directly():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = init_model(CONFIG, mesh=mesh, seed=0)
    plain = Qwen3(CONFIG, rngs=nnx.Rngs(0))
    up = nnx.state(model)["layers"]["up_proj"].get_value()
    assert up.sharding.spec == P(None, "fsdp", "tensor")
    # compiled and eager normal sampling may differ in the last ulp
    np.testing.assert_allclose(np.asarray(up), np.asarray(nnx.state(plain)["layers"]["up_proj"].get_value()), rtol=1e-6)


def test_kv_cache_decode_equals_full_forward(attention_path):
    model = Qwen3(CONFIG, rngs=nnx.Rngs(1))
    ids, positions = _inputs(batch=3, steps=14, seed=2)
    full = model(ids, positions)
    prompt = 5
    cache = model.empty_cache(batch=3, slots=16)
    hidden, cache = model.extend(ids[:, :prompt], positions[:, :prompt], cache)
    outputs = [model.logits(hidden)]
    for t in range(prompt, 14):  # one token at a time
        hidden, cache = model.extend(ids[:, t:t + 1], positions[:, t:t + 1], cache)
        outputs.append(model.logits(hidden))
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outputs, axis=1)), np.asarray(full), atol=2e-5, rtol=0)
    assert int(cache.end) == 14 and bool(cache.valid[:, :14].all()) and not bool(cache.valid[:, 14:].any())


def test_kv_cache_with_left_padding_matches_unpadded_rows(attention_path):
    model = Qwen3(CONFIG, rngs=nnx.Rngs(3))
    lengths, width, new = [6, 3], 6, 4
    ids, _ = _inputs(batch=2, steps=width + new, seed=4)
    valid = np.arange(width)[None] >= (width - np.array(lengths))[:, None]
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    cache = model.empty_cache(batch=2, slots=width + new)
    _, cache = model.extend(ids[:, :width], jnp.asarray(positions), cache, token_valid=jnp.asarray(valid))
    decoded = []
    for t in range(new):
        pos = jnp.asarray(np.array(lengths)[:, None] + t)
        hidden, cache = model.extend(ids[:, width + t:width + t + 1], pos, cache)
        decoded.append(model.logits(hidden))
    decoded = np.asarray(jnp.concatenate(decoded, axis=1))
    for row, length in enumerate(lengths):
        alone = jnp.concatenate([ids[row, width - length:width], ids[row, width:]])[None]
        want = model(alone, jnp.arange(alone.shape[1])[None])
        np.testing.assert_allclose(decoded[row], np.asarray(want[0, length:]), atol=2e-5, rtol=0)


def test_kv_cache_overflow_is_an_error_not_a_clamped_write():
    model = Qwen3(CONFIG, rngs=nnx.Rngs(1))
    ids, positions = _inputs(batch=2, steps=6)
    with pytest.raises(ValueError, match="extending by 6 tokens, but the cache has 4 slots"):
        model.extend(ids, positions, model.empty_cache(batch=2, slots=4))
    _, cache = model.extend(ids[:, :3], positions[:, :3], model.empty_cache(batch=2, slots=5))
    with pytest.raises(ValueError, match="extending by 3 tokens at slot 3 needs 6 slots, but the cache has 5"):
        model.extend(ids[:, 3:], positions[:, 3:], cache)
    # Under jit the write pointer is traced: an overflowing call poisons its outputs with NaN.
    graphdef, state = nnx.split(model)

    @jax.jit
    def extend(state, cache, ids, positions):
        return nnx.merge(graphdef, state).extend(ids, positions, cache)

    hidden, _ = extend(state, cache, ids[:, 3:], positions[:, 3:])
    assert bool(jnp.isnan(hidden).all())
    hidden, _ = extend(state, cache, ids[:, 3:5], positions[:, 3:5])  # fits: same compiled shapes, no NaN
    assert bool(jnp.isfinite(hidden).all())


def test_empty_cache_takes_the_compute_dtype_and_bf16_decode_runs():
    bf16 = Qwen3(CONFIG, policy=DTypePolicy("bfloat16", "bfloat16"), rngs=nnx.Rngs(1))
    cache = bf16.empty_cache(batch=2, slots=8)
    assert cache.k.dtype == cache.v.dtype == jnp.bfloat16
    assert Qwen3(CONFIG, rngs=nnx.Rngs(1)).empty_cache(batch=2, slots=8).k.dtype == jnp.float32
    ids, positions = _inputs(batch=2, steps=6)
    hidden, cache = bf16.extend(ids, positions, cache)
    assert cache.k.dtype == jnp.bfloat16 and hidden.dtype == jnp.bfloat16
    full = bf16(ids, positions)
    np.testing.assert_allclose(np.asarray(bf16.logits(hidden)), np.asarray(full), atol=2e-2, rtol=0)


def test_decoder_layer_uses_ops_swiglu_mlp(monkeypatch):
    calls = []
    swiglu_mlp = ops.swiglu_mlp
    monkeypatch.setattr(ops, "swiglu_mlp", lambda h, *w: calls.append((h.shape, w[0].shape)) or swiglu_mlp(h, *w))
    ids, positions = _inputs(batch=2, steps=4)
    Qwen3(CONFIG, rngs=nnx.Rngs(0))(ids, positions)
    # traced once inside the layer scan
    assert calls == [((2, 4, CONFIG.hidden_size), (CONFIG.hidden_size, CONFIG.intermediate_size))]


def test_explicit_mask_equals_segment_ids_and_validates_shape():
    model = Qwen3(CONFIG, rngs=nnx.Rngs(5))
    ids, positions = _inputs(batch=2, steps=8)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((8, 8), bool)), (2, 8, 8))
    np.testing.assert_allclose(np.asarray(model(ids, positions, attention_mask=causal)),
                               np.asarray(model(ids, positions)), atol=1e-6)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, positions, attention_mask=causal[:, :4])
    with pytest.raises(ValueError, match="not both"):
        model(ids, positions, attention_mask=causal, segment_ids=jnp.ones((2, 8), jnp.int32))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_nothing_numerically(remat):
    ids, positions = _inputs(batch=2, steps=6)
    base = Qwen3(CONFIG, rngs=nnx.Rngs(6))
    checkpointed = Qwen3(CONFIG, remat=remat, rngs=nnx.Rngs(6))

    def loss(model):
        return jnp.mean(model(ids, positions) ** 2)

    g1 = nnx.grad(loss)(base)
    g2 = nnx.grad(loss)(checkpointed)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bf16_compute_stays_close_to_fp32():
    ids, positions = _inputs(batch=2, steps=10)
    fp32 = Qwen3(CONFIG, rngs=nnx.Rngs(7))
    bf16 = Qwen3(CONFIG, policy=DTypePolicy("float32", "bfloat16"), rngs=nnx.Rngs(7))
    a, b = fp32(ids, positions), bf16(ids, positions)
    assert b.dtype == jnp.float32  # logits always fp32
    assert float(jnp.max(jnp.abs(a - b))) < 0.05
    params_bf16 = Qwen3(CONFIG, policy=DTypePolicy("bfloat16", "bfloat16"), rngs=nnx.Rngs(7))
    assert nnx.state(params_bf16)["embed"].get_value().dtype == jnp.bfloat16


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(CONFIG, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="remat"):
        Qwen3(CONFIG, remat="sometimes", rngs=nnx.Rngs(0))
