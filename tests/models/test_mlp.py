"""``ops.swiglu_mlp``: its hand-written backward equals autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from expint_jax.models import ops


def _plain_mlp(h, w_gate, w_up, w_down):
    gate, up = h @ w_gate, h @ w_up
    return (gate / (1.0 + jnp.exp(-gate)) * up) @ w_down


def _arrays(dtype, shape=(3, 5, 16), hidden=24, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    embed = shape[-1]
    h = jax.random.normal(keys[0], shape)
    weights = [jax.random.normal(k, s) / np.sqrt(s[0])
               for k, s in zip(keys[1:4], [(embed, hidden), (embed, hidden), (hidden, embed)])]
    out_grad = jax.random.normal(keys[4], shape)
    return [x.astype(dtype) for x in (h, *weights, out_grad)]


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 16), (2, 1, 4, 16)])
def test_value_and_gradients_equal_autodiff_fp32(shape):
    h, w_gate, w_up, w_down, out_grad = _arrays(jnp.float32, shape)
    expected, expected_vjp = jax.vjp(_plain_mlp, h, w_gate, w_up, w_down)
    value, vjp = jax.vjp(ops.swiglu_mlp, h, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(value), np.asarray(expected), rtol=1e-6, atol=1e-6)
    for name, got, want in zip(["h", "gate", "up", "down"], vjp(out_grad), expected_vjp(out_grad)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)


def test_gradients_match_central_differences_in_float64():
    arrays = [np.asarray(x, np.float64) for x in _arrays(jnp.float32, (2, 3, 16))]
    rng = np.random.default_rng(0)
    with jax.enable_x64():
        args = [jnp.asarray(x) for x in arrays[:4]]
        weight = jnp.asarray(arrays[4])
        loss = lambda *a: jnp.sum(ops.swiglu_mlp(*a) * weight)  # noqa: E731
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
        for i, (arg, grad) in enumerate(zip(args, grads)):
            assert grad.dtype == jnp.float64
            direction = jnp.asarray(rng.standard_normal(arg.shape))
            step = 1e-6
            plus = [a + step * direction if j == i else a for j, a in enumerate(args)]
            minus = [a - step * direction if j == i else a for j, a in enumerate(args)]
            numeric = (loss(*plus) - loss(*minus)) / (2 * step)
            np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(numeric), rtol=1e-6, err_msg=str(i))


def test_bfloat16_stays_bfloat16_and_close_to_fp32():
    arrays32 = _arrays(jnp.float32)
    arrays16 = [x.astype(jnp.bfloat16) for x in arrays32]
    value, vjp = jax.vjp(ops.swiglu_mlp, *arrays16[:4])
    grads = vjp(arrays16[4])
    assert value.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    want_value, want_vjp = jax.vjp(_plain_mlp, *arrays32[:4])
    np.testing.assert_allclose(np.asarray(value, np.float32), np.asarray(want_value), atol=5e-2, rtol=5e-2)
    for got, want in zip(grads, want_vjp(arrays32[4])):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=3e-2 * scale, rtol=0)


def test_constraint_applies_to_projections_and_their_gradients():
    h, w_gate, w_up, w_down, out_grad = _arrays(jnp.float32)
    seen = []

    def constrain(x):
        seen.append(x.shape)
        return x

    _, vjp = jax.vjp(lambda *a: ops.swiglu_mlp(*a, constrain_hidden=constrain), h, w_gate, w_up, w_down)
    forward_calls = len(seen)
    vjp(out_grad)
    assert forward_calls == 2 and len(seen) == 4  # gate and up, then their cotangents
    assert set(seen) == {h.shape[:-1] + (w_gate.shape[1],)}


def test_backward_builds_no_transposed_copy_of_activations():
    """The reason for the custom backward: weight gradients contract tokens in place (XLA:CPU)."""
    h, w_gate, w_up, w_down, _ = _arrays(jnp.float32, (2, 64, 16), hidden=48)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ops.swiglu_mlp(*a) ** 2), argnums=(0, 1, 2, 3)))
    hlo = grads.lower(h, w_gate, w_up, w_down).compile().as_text()
    activation_shapes = ("f32[48,2,64]", "f32[48,128]", "f32[16,2,64]", "f32[16,128]")
    transposed = [line for line in hlo.splitlines()
                  if " transpose(" in line and any(s in line.split("=")[1][:40] for s in activation_shapes)]
    assert not transposed, transposed
