"""Putting arrays on a mesh: a model's parameters by their logical axes, a host batch by its rows.

Contract: ``shard_model`` re-places an existing NNX module's parameters in place according to the
logical-axis rules. ``shard_batch`` turns a host batch (any pytree of NumPy arrays whose leading
axis is rows) into device arrays with rows on the ``batch`` logical axis: one process puts the
whole batch; under multi-controller JAX each process passes only its own rows and gets back the
global array (every process must pass the same number of rows, and the global row count must
divide over the ``batch`` rule's mesh axes). Without a mesh the batch is put, unsharded, on the
default device. Nothing here knows what model or batch type it places.
"""

from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from expint_jax.parallel.rules import DEFAULT_RULES, LogicalRules, logical_to_spec, param_shardings

Batch = TypeVar("Batch")


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: LogicalRules = DEFAULT_RULES) -> nnx.Module:
    """Moves every parameter of ``model`` to its sharding on ``mesh`` (in place) and returns it."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def batch_sharding(mesh: jax.sharding.Mesh, rows: int, rules: LogicalRules = DEFAULT_RULES) -> jax.sharding.NamedSharding:
    """Where a batch of ``rows`` (global) rows lives: rows on the ``batch`` logical axis when the
    mesh axes divide them, else replicated."""
    return jax.sharding.NamedSharding(mesh, logical_to_spec(("batch",), rules, dict(mesh.shape), (rows,)))


def shard_batch(batch: Batch, mesh: jax.sharding.Mesh | None, rules: LogicalRules = DEFAULT_RULES) -> Batch:
    """This process's rows of ``batch`` as (global) device arrays, rows on the ``batch`` logical axis.

    Args:
      batch: a pytree of host arrays, rows on the leading axis (this process's rows only when
        several processes take part).
      mesh: the device mesh; ``None`` puts the batch on the default device, unsharded.
      rules: logical-axis rules (the ``batch`` rule decides which mesh axes split the rows).
    """
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    local_rows = jax.tree.leaves(batch)[0].shape[0]
    processes = jax.process_count()
    global_rows = local_rows * processes
    sharding = batch_sharding(mesh, global_rows, rules)
    if processes == 1:
        return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
    if sharding.spec == jax.sharding.PartitionSpec(None):
        raise ValueError(f"{processes} processes: a batch of {global_rows} rows must be divisible by the mesh axes "
                         f"of the 'batch' rule ({dict(mesh.shape)}) so that each process holds only its rows")
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:])),
                        batch)
