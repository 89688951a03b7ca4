"""Logical axis names -> mesh shardings.

Models annotate parameters with logical axis names (``embed``, ``heads``, ``kv``, ``mlp``,
``vocab``, ...). A rules table (a list of ``(logical_name, mesh_axis_or_axes_or_None)``) maps them
to mesh axes; data parallelism, FSDP and tensor parallelism are different tables, not code.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from research.core.config import ConfigError

BATCH_AXES = ("data", "fsdp")

# Pure data parallelism: parameters replicated, the batch split over data (and fsdp).
DATA_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", None), ("embed", None), ("heads", None), ("kv", None), ("mlp", None),
    ("length", None),
)
PRESETS = {"data_parallel": DATA_PARALLEL_RULES}


def rules_from_config(sharding_config) -> tuple[tuple[str, Any], ...]:
    preset = sharding_config.get("preset", "data_parallel")
    if preset not in PRESETS:
        raise ConfigError(f"config.sharding.preset={preset!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


def logical_to_sharding(logical_specs, mesh, rules) -> Any:
    """Tree of logical PartitionSpecs (from ``nn.get_partition_spec``) -> NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def check_divisible(abstract_tree, shardings) -> None:
    """Every sharded dimension must divide by its mesh axes; name the offending leaf if not."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(leaves, shard_leaves):
        if not hasattr(leaf, "shape"):
            continue
        for dim, axes in zip(leaf.shape, sharding.spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
            if dim % size:
                raise ConfigError(
                    f"Parameter {jax.tree_util.keystr(path)} with shape {leaf.shape} cannot be "
                    f"sharded over mesh axes {axes} (size {size}): {dim} does not divide by {size}. "
                    "Change config.mesh or the model size.")


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch(global_batch: int, mesh, what: str = "config.batch_size") -> None:
    n = data_parallel_size(mesh)
    if global_batch % n:
        raise ConfigError(
            f"{what}={global_batch} does not divide over the {n} data-parallel devices "
            f"(mesh data x fsdp); use a multiple of {n}.")


def local_slice(global_batch: int) -> slice:
    """The rows of a global batch this process feeds (all processes build the same global batch)."""
    per = global_batch // jax.process_count()
    start = jax.process_index() * per
    return slice(start, start + per)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding, axis: int = 0):
    """Global numpy batch (identical on every process) -> globally sharded jax Arrays."""
    def put(x):
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        sl = [slice(None)] * x.ndim
        sl[axis] = local_slice(x.shape[axis])
        return jax.make_array_from_process_local_data(sharding, x[tuple(sl)], x.shape)
    return jax.tree.map(put, batch)


def specs_of(shardings) -> Sequence:
    return jax.tree.map(lambda s: s.spec, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
