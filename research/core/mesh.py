"""Device mesh from config, and multi-host initialisation.

``config.mesh`` gives a size per axis (``data``, ``fsdp``, ``tensor``, ``pipeline``, ``expert``);
one size may be -1 to take the remaining devices. Meshes use Auto axis types on purpose (this JAX
defaults ``jax.make_mesh`` to Explicit, which changes how shardings propagate).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from research.core.config import ConfigError

AXES = ("data", "fsdp", "tensor", "pipeline", "expert")


def axis_sizes(mesh_config, num_devices: int) -> tuple[int, ...]:
    sizes = {a: int(mesh_config.get(a, 1)) for a in AXES}
    unknown = set(mesh_config.keys()) - set(AXES)
    if unknown:
        raise ConfigError(f"Unknown config.mesh axes {sorted(unknown)}; known: {list(AXES)}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"Only one config.mesh axis may be -1, got {fill}")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ConfigError(f"config.mesh.{bad[0]}={sizes[bad[0]]}: expected a positive size or -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh: {num_devices} devices do not divide by the fixed axis sizes "
                f"(product {fixed}); change config.mesh so the product divides {num_devices}.")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"config.mesh {sizes} uses {math.prod(sizes.values())} devices but {num_devices} are "
            "present; set one axis to -1 to fill, or change the sizes.")
    return tuple(sizes[a] for a in AXES)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = axis_sizes(mesh_config, len(devices))
    try:
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    except Exception:  # noqa: BLE001 - fall back to a plain row-major device order
        return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def maybe_initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                                 process_id: int | None, auto: bool = False) -> None:
    """``jax.distributed.initialize`` for multi-host runs (explicit address, or auto-detected on
    clusters JAX knows: TPU pods, SLURM, Open MPI). Single-process runs skip it."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif auto:
        jax.distributed.initialize()
