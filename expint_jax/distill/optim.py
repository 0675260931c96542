"""The optimizer of context distillation: AdamW, linear warm-up then cosine decay, global-norm
clipping, and weight decay only on matrices (never on norms or biases).

Low-precision parameters: an AdamW step at a learning rate of 1e-5 is far below bfloat16's
resolution (8 significant bits: a relative change below about 2^-9 rounds away), so updating
bfloat16 weights in place would leave most of them unchanged. ``make_optimizer(..., master_weights=True)``
keeps float32 **master weights** in the optimizer state (``MasterWeightsState``): clipping and
AdamW run on float32 gradients and the master copy, and the model's parameters become the master
rounded to their own dtype (``apply_updates``). ``step.init_train_state`` refuses non-float32
parameters without master weights.

Placement: ``state_shardings`` places every optimizer-state leaf that mirrors a parameter (Adam's
moments, the master weights) like that parameter, so a sharded model gets a sharded optimizer
state; left to the compiler, ``jit(optimizer.init)`` replicates the moments (they are zeros that
depend on no input's placement), which costs two parameter copies on every device.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    total_steps: int = 1000
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0  # cosine decays to learning_rate * end_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        if self.total_steps < 1:
            raise ValueError(f"optimizer.total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]")
        if self.max_grad_norm <= 0:
            raise ValueError(f"optimizer.max_grad_norm must be > 0, got {self.max_grad_norm}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``learning_rate * end_lr_ratio`` at
    ``total_steps``. A run no longer than its warm-up (a short run) only warms up."""
    if config.warmup_steps >= config.total_steps:
        return optax.linear_schedule(0.0, config.learning_rate, config.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if config.warmup_steps else config.learning_rate,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.end_lr_ratio,
    )


def is_scale_or_bias(path) -> bool:
    """Whether the parameter at ``path`` (a pytree key path) is a norm scale or a bias: a path key
    (e.g. ``attn_norm``, ``final_norm``, ``q_bias``) names it so."""
    keys = (str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    return any("norm" in key or "bias" in key for key in keys)


def decay_mask(params: nnx.State) -> nnx.State:
    """True for parameters that get weight decay: everything but norms and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: not is_scale_or_bias(path), params)


class MasterWeightsState(NamedTuple):
    """Optimizer state with float32 master weights; ``inner`` is the wrapped optimizer's state."""

    master: optax.Params
    inner: optax.OptState


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` run on float32 gradients and float32 master copies of the parameters.

    The updates it returns are the new master minus the current parameters, in float32; use
    ``apply_updates`` to set the parameters to the master rounded to their dtype exactly.
    """

    def init(params):
        master = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        return MasterWeightsState(master=master, inner=inner.init(master))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("with_master_weights needs the current params in update()")
        grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), updates)
        steps, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, steps)
        deltas = jax.tree.map(lambda m, p: m - jnp.asarray(p, jnp.float32), master, params)
        return deltas, MasterWeightsState(master=master, inner=inner_state)

    return optax.GradientTransformation(init, update)


def apply_updates(params: optax.Params, updates: optax.Updates, opt_state: optax.OptState) -> optax.Params:
    """The new parameters: the master weights in the parameters' dtypes under ``with_master_weights``
    (exactly the rounded master, whatever the rounding of ``params + updates``), else
    ``optax.apply_updates``."""
    if isinstance(opt_state, MasterWeightsState):
        return jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, params)
    return optax.apply_updates(params, updates)


def needs_master_weights(params: nnx.State) -> bool:
    """Whether any floating-point parameter is stored below float32 (e.g. bfloat16)."""
    return any(jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32 for x in jax.tree.leaves(params))


def state_shardings(opt_state: optax.OptState, params: nnx.State) -> optax.OptState | None:
    """A sharding per leaf of ``opt_state`` (arrays or shapes): a leaf whose key path ends with a
    parameter's path and has its shape gets that parameter's sharding, every other leaf (step
    counts) is replicated on the parameters' mesh. None when the parameters are not placed on a
    mesh (``NamedSharding``): then there is nothing to follow."""
    placed = {path: x for path, x in jax.tree_util.tree_leaves_with_path(params)}
    shardings = [getattr(x, "sharding", None) for x in placed.values()]
    if not shardings or not all(isinstance(s, jax.sharding.NamedSharding) for s in shardings):
        return None
    replicated = jax.sharding.NamedSharding(shardings[0].mesh, jax.sharding.PartitionSpec())

    def follow(path, leaf):
        for length in range(len(path)):  # the longest parameter path that ends this leaf's path
            param = placed.get(tuple(path[length:]))
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(follow, opt_state)


def make_optimizer(config: OptimizerConfig, *, master_weights: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clipping + AdamW with ``config``'s schedule; ``master_weights`` for parameters below float32."""
    schedule = learning_rate_schedule(config)
    tx = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                    mask=decay_mask),
    )
    return (with_master_weights(tx) if master_weights else tx), schedule
