"""Creating a Qwen3: shape-only (nothing allocated) or randomly initialized, sharded from birth.

Contract: ``abstract_model`` returns ``(graphdef, state)`` whose leaves are ``ShapeDtypeStruct``s,
the skeleton the checkpoint loader fills; ``init_model`` returns a model whose parameters were
created by one jitted call with their final shardings (``parallel.rules.param_shardings``), so a
large model is never whole on one device. Both take the same dtype policy, rules and remat mode
as ``Qwen3`` itself.
"""

from __future__ import annotations

import jax
from flax import nnx

from expint_jax.models.config import DTypePolicy, Qwen3Config
from expint_jax.models.qwen3 import Qwen3
from expint_jax.parallel.rules import DEFAULT_RULES, LogicalRules, param_shardings


def abstract_model(config: Qwen3Config, *, policy: DTypePolicy = DTypePolicy(), rules: LogicalRules = DEFAULT_RULES,
                   remat: str = "none") -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of a Qwen3, without allocating parameters."""
    model = nnx.eval_shape(lambda: Qwen3(config, policy=policy, rules=rules, remat=remat, rngs=nnx.Rngs(0)))
    return nnx.split(model)


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
    """A randomly initialized Qwen3 whose parameters are created already sharded.

    Args:
      config: the architecture.
      mesh: where the parameters live; ``None`` for the default device, unsharded.
      rules: logical-axis rules mapping parameter axes to mesh axes.
      policy: parameter and compute dtypes.
      remat: the decoder layers' rematerialization mode.
      init_std: standard deviation of the normal initializer.
      seed: the initializer's seed (same seed, same parameters, whatever the mesh).
    """

    def create() -> Qwen3:
        return Qwen3(config, policy=policy, rules=rules, remat=remat, init_std=init_std, rngs=nnx.Rngs(seed))

    if mesh is None:
        return create()
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = param_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
