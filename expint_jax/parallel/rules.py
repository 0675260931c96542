"""Logical-axis sharding: model code names axes, one table maps the names to mesh axes.

Model code annotates every parameter (``nnx.Param(..., logical_axes=("embed", "mlp"))``) and
constrains activations (``constrain(x, ("batch", "seq", "act_embed"), rules)``). The table
``DEFAULT_RULES`` below is the only place that knows the mesh axes ``data``, ``fsdp``, ``tensor``.

Resolution rules (``logical_to_spec``):
  * each logical name maps to one mesh axis, a tuple of them, or ``None`` (replicated);
  * a mesh axis is used at most once per array (later dimensions lose it);
  * when the array's dimension is not divisible by the mesh axes' total size, that dimension is
    replicated instead of failing (e.g. 2 KV heads on a tensor axis of 4), so one table serves
    every model size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def rules_from_config(overrides: Mapping[str, str | Sequence[str] | None] | None) -> LogicalRules:
    """``DEFAULT_RULES`` with some names remapped, e.g. ``{"seq": "tensor"}``; unknown names are errors."""
    table = dict(DEFAULT_RULES)
    for name, target in (overrides or {}).items():
        if name not in table:
            raise KeyError(f"sharding rule for unknown logical axis {name!r}; known: {sorted(table)}")
        table[name] = tuple(target) if isinstance(target, (list, tuple)) else target
    return tuple(table.items())


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: LogicalRules,
    mesh_shape: Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` (see the module docstring for the rules)."""
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table[name]
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh_shape is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh_shape and mesh_shape[a] > 1)
            if shape is not None and mesh_axes:
                size = 1
                for a in mesh_axes:
                    size *= mesh_shape[a]
                if shape[dim] % size:
                    mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: LogicalRules) -> jax.Array:
    """Sharding constraint on an activation when a mesh is active (``jax.set_mesh``), else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, rules, dict(mesh.shape), x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def param_specs(state: nnx.State, rules: LogicalRules, mesh_shape: Mapping[str, int] | None = None) -> nnx.State:
    """A ``PartitionSpec`` for every variable of an NNX state, from its ``logical_axes`` metadata.

    Variables without ``logical_axes`` are replicated.
    """

    def spec_of(variable: nnx.Variable) -> PartitionSpec:
        axes = variable.get_metadata().get("logical_axes")
        value = variable.get_value()
        if axes is None:
            return PartitionSpec()
        if len(axes) != value.ndim:
            raise ValueError(f"logical_axes {axes} has {len(axes)} names for an array of shape {value.shape}")
        return logical_to_spec(axes, rules, mesh_shape, value.shape)

    return jax.tree.map(spec_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: LogicalRules) -> nnx.State:
    """``NamedSharding`` per variable, for ``jax.device_put`` or ``jit(out_shardings=...)``."""
    specs = param_specs(state, rules, dict(mesh.shape))
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
