"""Loss landscapes of context distillation: the loss along a line or over a plane of parameters.

Pure helpers for notebooks (``notebooks/loss_landscape.ipynb``):
  * ``interpolate(a, b, alpha)``: (1 - alpha) * a + alpha * b, leaf by leaf;
  * ``relative_distance(a, b)``: ||b - a|| / ||a|| over all leaves (how far a training moved);
  * ``filter_normalized_direction(params, key)``: a Gaussian direction with **per-filter
    normalization** (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets"): every
    filter of the direction is rescaled to the norm of the same filter of the parameters, so that
    one unit is the same relative step for every unit of every layer. A filter is one output unit
    (``filter_axes``); norm scales and biases (``optim.is_scale_or_bias``, the parameters without
    weight decay) get no direction, as in the paper;
  * ``loss_along_line`` / ``loss_on_plane``: held-out metrics of the distillation loss at each
    point, computed with the training code's own eval step (``step.make_eval_step``) and the
    trainer's exact aggregation (``trainer.aggregate_eval``), so the numbers are the ones the
    trainer reports.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from expint_jax.distill.batch import DistillBatch
from expint_jax.distill.optim import is_scale_or_bias
from expint_jax.distill.step import StepConfig, make_eval_step
from expint_jax.parallel.placement import shard_batch
from expint_jax.distill.trainer import aggregate_eval


def interpolate(a: nnx.State, b: nnx.State, alpha: float) -> nnx.State:
    return jax.tree.map(lambda x, y: ((1 - alpha) * x + alpha * y).astype(x.dtype), a, b)


def relative_distance(a: nnx.State, b: nnx.State) -> float:
    """||b - a|| / ||a||, the global (all-leaf) Euclidean norms, in float32."""
    def squares(tree) -> jax.Array:
        return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))

    diff = jax.tree.map(lambda x, y: y.astype(jnp.float32) - x.astype(jnp.float32), a, b)
    return float(jnp.sqrt(squares(diff) / squares(a)))


def filter_axes(logical_axes: Sequence[str | None]) -> tuple[int, ...]:
    """The axes one filter spans in a parameter with these logical axis names (the norm is taken
    over them; every other index picks one filter).

    Qwen3 stores its projections as ``[layers, inputs..., outputs...]``, and a filter is one output
    unit with all its input weights (one output channel of a convolution, one neuron of a dense
    layer), separately in every layer:

    * ``q/k/v_proj [layers, embed, heads, head_dim]`` -> ``(embed,)``: one filter per (head, dim);
    * ``o_proj [layers, heads, head_dim, embed]`` -> ``(heads, head_dim)``: one per output feature;
    * ``gate/up_proj [layers, embed, mlp]`` -> ``(embed,)``; ``down_proj [layers, mlp, embed]`` -> ``(mlp,)``;
    * ``embed`` / ``lm_head [vocab, embed]`` -> ``(embed,)``: one filter per token row.

    Rule: the ``layers`` axis and the output axes are kept; the output axes are ``vocab`` when the
    parameter has one (a token table), else the last axis, together with a preceding
    ``heads``/``kv_heads`` axis when the last is ``head_dim``.
    """
    names = list(logical_axes)
    if not names:
        return ()
    if "vocab" in names:
        kept = {names.index("vocab")}
    else:
        kept = {len(names) - 1}
        if names[-1] == "head_dim" and len(names) >= 2 and names[-2] in ("heads", "kv_heads"):
            kept.add(len(names) - 2)
    kept |= {i for i, name in enumerate(names) if name == "layers"}
    return tuple(i for i in range(len(names)) if i not in kept)


def filter_normalized_direction(params: nnx.State, key: jax.Array) -> nnx.State:
    """A Gaussian direction, each filter rescaled to the norm of the same filter of ``params``
    (see ``filter_axes``); zero on norm scales and biases. Needs the parameters' ``logical_axes``
    metadata (any state split from a ``Qwen3`` has it)."""
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    variables, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)
    keys = jax.random.split(key, len(variables))
    out = []
    for (path, variable), k in zip(variables, keys):
        value = variable.get_value() if is_variable(variable) else variable
        if is_scale_or_bias(path):
            direction = jnp.zeros_like(value)
        else:
            axes = variable.get_metadata().get("logical_axes") if is_variable(variable) else None
            if axes is None or len(axes) != value.ndim:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)} {value.shape}: no logical_axes metadata "
                                 f"matching its rank (got {axes!r}); filter normalization needs it to find the filters")
            reduce = filter_axes(axes)

            def norm(x):
                return jnp.sqrt(jnp.sum(jnp.square(x), axis=reduce, keepdims=True))

            noise = jax.random.normal(k, value.shape, jnp.float32)
            direction = (noise * (norm(value.astype(jnp.float32)) / jnp.maximum(norm(noise), 1e-12))
                         ).astype(value.dtype)
        out.append(variable.replace(direction) if is_variable(variable) else direction)
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=8)
def _eval_step(graphdef: nnx.GraphDef, config: StepConfig):
    """One jitted eval step per (graphdef, config): the line and the plane share its compilation."""
    return make_eval_step(graphdef, config)


def _metrics_at(evaluate, params: nnx.State, teacher_params: nnx.State | None,
                batches: Sequence[DistillBatch]) -> dict[str, float]:
    return aggregate_eval(evaluate(params, teacher_params, batch) for batch in batches)


def loss_along_line(graphdef: nnx.GraphDef, start: nnx.State, end: nnx.State, teacher_params: nnx.State | None,
                    batches: Iterable[DistillBatch], config: StepConfig,
                    alphas: Sequence[float]) -> list[dict[str, float]]:
    """Held-out metrics (``aggregate_eval``'s: loss, kl when the loss tracks it, tokens, sequences)
    at ``interpolate(start, end, alpha)`` for each alpha (outside [0, 1] extrapolates)."""
    evaluate = _eval_step(graphdef, config)
    device_batches = [shard_batch(b, None) for b in batches]
    return [{"alpha": float(a), **_metrics_at(evaluate, interpolate(start, end, a), teacher_params, device_batches)}
            for a in alphas]


def loss_on_plane(graphdef: nnx.GraphDef, center: nnx.State, directions: tuple[nnx.State, nnx.State],
                  teacher_params: nnx.State | None, batches: Iterable[DistillBatch], config: StepConfig,
                  xs: Sequence[float], ys: Sequence[float], metric: str = "loss") -> np.ndarray:
    """``metric`` (a key of ``aggregate_eval``'s result) at ``center + x * d1 + y * d2`` on the grid
    ``ys x xs`` (rows are y)."""
    evaluate = _eval_step(graphdef, config)
    device_batches = [shard_batch(b, None) for b in batches]
    d1, d2 = directions
    grid = np.zeros((len(ys), len(xs)))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            point = jax.tree.map(lambda c, u, v: (c + x * u + y * v).astype(c.dtype), center, d1, d2)
            metrics = _metrics_at(evaluate, point, teacher_params, device_batches)
            if metric not in metrics:
                raise KeyError(f"metric {metric!r} is not reported for divergence {config.divergence.kind!r}; "
                               f"choose one of {sorted(metrics)}")
            grid[i, j] = metrics[metric]
    return grid
