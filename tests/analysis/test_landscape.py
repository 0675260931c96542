"""Loss-landscape helpers: interpolation end points, per-filter normalization, the line and the plane."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from expint_jax.distill.batch import bucket_shape, collate
from expint_jax.analysis.landscape import (filter_axes, filter_normalized_direction, interpolate, loss_along_line,
                                          loss_on_plane, relative_distance)
from expint_jax.distill.losses import Divergence
from expint_jax.distill.step import StepConfig, make_eval_step
from expint_jax.parallel.placement import shard_batch
from expint_jax.distill.views import build_example
from expint_jax.models.config import tiny
from expint_jax.models.qwen3 import Qwen3
from tests.distill.conftest import make_trajectory

CONFIG = tiny(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def setup(chat):
    examples = [build_example(make_trajectory(2, "stepwise", task_id=f"t{i}"), chat) for i in range(2)]
    batch = collate(examples, bucket_shape(examples, rows=2, bucket=128, loss_bucket=64))
    graphdef, teacher = nnx.split(Qwen3(CONFIG, init_std=0.1, rngs=nnx.Rngs(0)), nnx.Param)
    _, other = nnx.split(Qwen3(CONFIG, init_std=0.1, rngs=nnx.Rngs(1)), nnx.Param)
    return graphdef, teacher, other, batch


def test_interpolation_end_points_and_midpoint(setup):
    _, a, b, _ = setup
    for x, y in zip(jax.tree.leaves(interpolate(a, b, 0.0)), jax.tree.leaves(a)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    mid = jax.tree.leaves(interpolate(a, b, 0.5))
    for m, x, y in zip(mid, jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(m), (np.asarray(x) + np.asarray(y)) / 2, rtol=1e-6)


def test_relative_distance_is_the_global_norm_of_the_difference_over_the_start(setup):
    _, a, b, _ = setup
    flat = lambda tree: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
    expected = np.linalg.norm(flat(b) - flat(a)) / np.linalg.norm(flat(a))
    assert relative_distance(a, b) == pytest.approx(expected, rel=1e-5)
    assert relative_distance(a, interpolate(a, b, 0.5)) == pytest.approx(expected / 2, rel=1e-5)
    assert relative_distance(a, a) == 0.0


def test_filter_axes_are_the_inputs_of_one_output_unit():
    assert filter_axes(("layers", "embed", "heads", "head_dim")) == (1,)  # q/k/v: one filter per (head, dim)
    assert filter_axes(("layers", "heads", "head_dim", "embed")) == (1, 2)  # o_proj: one per output feature
    assert filter_axes(("layers", "embed", "mlp")) == (1,) and filter_axes(("layers", "mlp", "embed")) == (1,)
    assert filter_axes(("vocab", "embed")) == (1,)  # embedding / lm_head: one filter per token row


def _filter_norms(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Reference: the norm of every filter, by moving the filter's axes last and flattening them."""
    kept = [i for i in range(x.ndim) if i not in axes]
    moved = np.transpose(x, kept + list(axes)).astype(np.float64)
    return np.linalg.norm(moved.reshape(*moved.shape[:len(kept)], -1), axis=-1)


def test_every_filter_of_the_direction_has_the_norm_of_the_parameters_filter():
    model = Qwen3(tiny(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, attention_bias=True, tie_word_embeddings=False), init_std=0.1, rngs=nnx.Rngs(3))
    params = nnx.state(model, nnx.Param)
    direction = filter_normalized_direction(params, jax.random.key(0))
    expected_axes = {"embed": (1,), "lm_head": (1,), "q_proj": (1,), "k_proj": (1,), "v_proj": (1,),
                     "o_proj": (1, 2), "gate_proj": (1,), "up_proj": (1,), "down_proj": (1,)}
    seen = set()
    assert jax.tree.structure(direction) == jax.tree.structure(params)
    for (path, value), d in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(direction)):
        name, d = path[-2].key, np.asarray(d)  # path: (..., DictKey(name), GetAttrKey('value'))
        if "norm" in name or "bias" in name:
            assert not d.any(), name  # norm scales and biases stay put
            continue
        seen.add(name)
        want, got = _filter_norms(np.asarray(value), expected_axes[name]), _filter_norms(d, expected_axes[name])
        assert want.shape == got.shape and want.size > 1, name
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
        assert not np.allclose(d, np.asarray(value))  # a random direction, not the parameters themselves
    assert seen == set(expected_axes)


def test_line_and_plane_use_the_trainers_eval_numbers(setup):
    graphdef, teacher, other, batch = setup
    config = StepConfig(Divergence("forward_kl"), chunk_size=64)
    line = loss_along_line(graphdef, teacher, other, teacher, [batch], config, alphas=[0.0, 1.0])
    assert line[0]["loss"] > 0  # same weights, but the teacher sees the experience
    direct = make_eval_step(graphdef, config)(other, teacher, shard_batch(batch, None))
    assert line[1]["loss"] == pytest.approx(float(direct["loss"]), rel=1e-6)
    assert line[1]["kl"] == pytest.approx(float(direct["kl"]), rel=1e-6)
    assert line[1]["tokens"] == float(batch.weights.sum()) and line[1]["sequences"] == 2
    directions = (filter_normalized_direction(teacher, jax.random.key(1)),
                  filter_normalized_direction(teacher, jax.random.key(2)))
    grid = loss_on_plane(graphdef, teacher, directions, teacher, [batch], config, xs=[0.0, 0.5], ys=[0.0, 0.5],
                         metric="kl")
    assert grid.shape == (2, 2) and grid[0, 0] == pytest.approx(line[0]["kl"], rel=1e-6)
    assert np.all(np.isfinite(grid)) and grid[1, 1] > grid[0, 0]


def test_a_loss_without_kl_reports_no_kl(setup):
    graphdef, teacher, other, batch = setup
    config = StepConfig(Divergence("nll"), chunk_size=64)
    (point,) = loss_along_line(graphdef, other, other, None, [batch], config, alphas=[0.0])
    assert "kl" not in point and point["loss"] > 0  # omitted, never a made-up 0
    directions = (jax.tree.map(jnp.zeros_like, other),) * 2
    with pytest.raises(KeyError, match="'kl' is not reported for divergence 'nll'"):
        loss_on_plane(graphdef, other, directions, None, [batch], config, xs=[0.0], ys=[0.0], metric="kl")
