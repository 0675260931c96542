"""Device meshes from configuration: axes ``data``, ``fsdp``, ``tensor``; -1 takes the rest.

All axes are ``AxisType.Auto``: the compiler propagates shardings from parameter placements and
the ``constrain`` calls in model code (GSPMD style), so model code stays free of mesh details.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    devices: int = 0  # use the first N devices (0: all), e.g. to leave some to an inference server

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Axis sizes with the single -1 replaced by what remains; errors name the axes."""
        sizes = [self.data, self.fsdp, self.tensor]
        unknown = [name for name, s in zip(MESH_AXES, sizes) if s == -1]
        if len(unknown) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
        for name, s in zip(MESH_AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(f"mesh: axis {name}={s}; sizes are positive or -1")
        known = math.prod(s for s in sizes if s != -1)
        if unknown:
            if num_devices % known:
                raise ValueError(f"mesh: {num_devices} devices do not divide into {self} (fixed axes use {known})")
            sizes[MESH_AXES.index(unknown[0])] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh: data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but {num_devices} devices are available"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    if config.devices:
        if config.devices > len(devices):
            raise ValueError(f"mesh: devices={config.devices} but only {len(devices)} are available")
        devices = devices[:config.devices]
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
