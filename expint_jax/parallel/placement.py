"""Putting NNX models on a mesh: random initialization directly into sharded arrays, or
re-placing an existing model's parameters according to the logical-axis rules."""

from __future__ import annotations

import jax
from flax import nnx

from expint_jax.models.config import DTypePolicy, Qwen3Config
from expint_jax.models.qwen3 import Qwen3
from expint_jax.parallel.rules import DEFAULT_RULES, LogicalRules, param_shardings


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: LogicalRules = DEFAULT_RULES) -> nnx.Module:
    """Moves every parameter of ``model`` to its sharding on ``mesh`` (in place) and returns it."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def init_model(
    config: Qwen3Config,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    policy: DTypePolicy = DTypePolicy(),
    remat: str = "none",
    init_std: float = 0.02,
    seed: int = 0,
) -> Qwen3:
    """A randomly initialized Qwen3 whose parameters are created already sharded (never whole on one device)."""

    def create() -> Qwen3:
        return Qwen3(config, policy=policy, rules=rules, remat=remat, init_std=init_std, rngs=nnx.Rngs(seed))

    if mesh is None:
        return create()
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = param_shardings(abstract, mesh, rules)

    state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
