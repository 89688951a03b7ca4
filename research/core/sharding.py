"""Logical axis names -> mesh shardings: data, ZeRO-1/2/3, FSDP and Megatron tensor parallelism
as rules tables, not code.

Models annotate parameters with logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``kv``, ``mlp``, ``expert``) and activations with ``act_*`` names (``sharding.constrain``). A
preset (``config.sharding.preset``) is a short table per kind of state, MaxText-style:

==============  ======================  ============================  =====================
preset          parameters              optimizer state               gradients
==============  ======================  ============================  =====================
data_parallel   replicated              replicated                    all-reduced
zero1           replicated              embed over (data, fsdp)       all-reduced
zero2           replicated              embed over (data, fsdp)       reduce-scattered
zero3           embed over (data, fsdp) like the parameters           like the parameters
fsdp            embed over fsdp         like the parameters           like the parameters
tensor          heads/kv_heads/mlp      like the parameters           like the parameters
                over tensor (Megatron)
fsdp_tensor     fsdp + tensor           like the parameters           like the parameters
==============  ======================  ============================  =====================

The batch is split over ``data`` x ``fsdp`` x ``expert`` in every preset, experts over
``expert``. Megatron: query/key/value and MLP-in kernels [embed, heads|mlp] are split on their
output dimension (column-parallel), attention-out and MLP-out [heads|mlp, embed] on their input
(row-parallel), so each block needs one all-reduce forward and one backward. ``fsdp`` keeps the
``data`` axis as replicas (hybrid sharding); ``zero3`` shards over every data-parallel device.
Every sharded dimension must divide by its mesh axes: ``check_divisible`` / ``constrain`` raise a
``ConfigError`` naming the tensor, never a silent replication.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from research.core.config import ConfigError

BATCH_AXES = ("data", "fsdp", "expert")
ZERO_AXES = ("data", "fsdp")  # the data-parallel axes ZeRO shards the state over

Rules = tuple[tuple[str, Any], ...]

# Activation names and the fixed entries shared by all presets.
_BASE = {
    "batch": BATCH_AXES, "act_batch": BATCH_AXES, "act_length": None, "act_embed": None,
    "act_heads": None, "act_kv_heads": None, "act_kv": None, "act_mlp": None, "act_vocab": None,
    "expert": "expert", "act_expert": "expert",
    # MoE dispatched tokens [batch, expert, capacity, embed]: batch over the other data axes.
    "act_expert_group": ("data", "fsdp"),
    "vocab": None, "embed": None, "heads": None, "kv_heads": None, "kv": None, "mlp": None,
    "length": None,
    # Blocks stacked for the pipeline (research.core.pipeline): [stage, stage_layer, ...].
    "stage": "pipeline", "stage_layer": None,
}
_TENSOR = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
           "act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor"}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Rules for the parameters (and activations), the optimizer state and the gradients."""
    params: Rules
    opt_state: Rules
    grads: Rules | None = None  # None: gradients are left to XLA (all-reduced to the params' layout)


def _rules(**overrides) -> Rules:
    table = {**_BASE, **overrides}
    return tuple(table.items())


def _preset(params: dict, opt_state: dict | None = None, grads_like_opt: bool = False) -> Preset:
    p = _rules(**params)
    o = _rules(**{**params, **opt_state}) if opt_state is not None else p
    return Preset(p, o, o if grads_like_opt else None)


PRESETS: dict[str, Preset] = {
    "data_parallel": _preset({}),
    "zero1": _preset({}, {"embed": ZERO_AXES}),
    "zero2": _preset({}, {"embed": ZERO_AXES}, grads_like_opt=True),
    "zero3": _preset({"embed": ZERO_AXES}),
    "fsdp": _preset({"embed": "fsdp"}),
    "tensor": _preset(_TENSOR),
    "fsdp_tensor": _preset({"embed": "fsdp", **_TENSOR}),
}
# Kept for callers of the first version: the data-parallel table.
DATA_PARALLEL_RULES = PRESETS["data_parallel"].params


def preset_from_config(sharding_config) -> Preset:
    name = sharding_config.get("preset", "data_parallel")
    if name not in PRESETS:
        raise ConfigError(f"config.sharding.preset={name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def rules_from_config(sharding_config) -> Rules:
    """The parameter (and activation) rules of the configured preset."""
    return preset_from_config(sharding_config).params


def logical_to_sharding(logical_specs, mesh, rules) -> Any:
    """Tree of logical PartitionSpecs (from ``nn.get_partition_spec``) -> NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def state_shardings(specs: dict, mesh, preset: Preset) -> dict:
    """Shardings of the train state ``{'step', 'params', 'opt_state', 'rng', ...}`` from its
    logical specs: the optimizer state by the preset's optimizer rules, the rest by the parameter
    rules."""
    return {k: logical_to_sharding(v, mesh, preset.opt_state if k == "opt_state" else preset.params)
            for k, v in specs.items()}


def grad_shardings(param_specs, mesh, preset: Preset):
    """Shardings the gradients are constrained to (ZeRO-2: the optimizer state's), or None."""
    if preset.grads is None:
        return None
    return logical_to_sharding(param_specs, mesh, preset.grads)


def _axes_size(axes, mesh_shape) -> tuple[tuple[str, ...], int]:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return axes, int(math.prod(mesh_shape[a] for a in axes))


def _divisibility_error(what: str, shape, dim_index: int, axes, mesh_shape) -> ConfigError:
    axes, size = _axes_size(axes, mesh_shape)
    sizes = " x ".join(f"{a}={mesh_shape[a]}" for a in axes)
    return ConfigError(
        f"{what} with shape {tuple(shape)} cannot be sharded over mesh axes {axes} ({sizes} = "
        f"{size} devices): dimension {dim_index} of size {shape[dim_index]} does not divide by "
        f"{size}. Change config.mesh, config.sharding.preset or the model/batch size.")


def check_divisible(abstract_tree, shardings, logical_specs=None) -> None:
    """Every sharded dimension must divide by its mesh axes; name the offending leaf (and its
    logical axis, given ``logical_specs``) if not."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    logical = (jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
               if logical_specs is not None else [None] * len(leaves))
    for (path, leaf), sharding, names in zip(leaves, shard_leaves, logical):
        if not hasattr(leaf, "shape"):
            continue
        for i, (dim, axes) in enumerate(zip(leaf.shape, sharding.spec)):
            if axes is None:
                continue
            if dim % _axes_size(axes, sharding.mesh.shape)[1]:
                name = names[i] if isinstance(names, P) and i < len(names) else None
                what = f"Tensor {jax.tree_util.keystr(path)}" + (
                    f" (logical axis {name!r} of {tuple(names)})" if name else "")
                err = _divisibility_error(what, leaf.shape, i, axes, sharding.mesh.shape)
                if name == "kv_heads":
                    err = ConfigError(f"{err} Key/value heads (config.model.num_kv_heads; "
                                      "num_heads without GQA) must divide by the tensor size.")
                raise err


def constrain(x: jax.Array, logical_axes: tuple, name: str) -> jax.Array:
    """``nn.with_logical_constraint`` for activations that refuses uneven shardings (which XLA
    would silently pad): a no-op outside ``activation_context`` (no rules set)."""
    rules = _ACTIVATION_RULES.get()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    mesh_axes = nn.logical_to_mesh_axes(logical_axes, rules)
    for i, (dim, axes) in enumerate(zip(x.shape, mesh_axes)):
        if axes is None:
            continue
        if dim % _axes_size(axes, dict(mesh.shape))[1]:
            raise _divisibility_error(f"Activation {name!r} {logical_axes}", x.shape, i, axes,
                                      dict(mesh.shape))
    return nn.with_logical_constraint(x, logical_axes, rules=rules)


# Rules for ``constrain`` only. Not Flax's ``nn.logical_axis_rules``: under that context Flax also
# constrains every parameter as it is unboxed, which fails for DenseGeneral's reshaped kernels
# (and the parameters' layout is already fixed by the step's in_shardings).
_ACTIVATION_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar(
    "activation_rules", default=None)


@contextlib.contextmanager
def activation_context(mesh, rules: Rules):
    """Rules and (abstract) mesh for the ``constrain`` calls traced inside; usable inside jit."""
    token = _ACTIVATION_RULES.set(tuple(rules))
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        _ACTIVATION_RULES.reset(token)


@contextlib.contextmanager
def no_activation_constraints():
    """``constrain`` is a no-op inside (code traced inside a ``shard_map``, where the activations
    are per-device blocks)."""
    token = _ACTIVATION_RULES.set(None)
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def with_activation_context(fn, mesh, rules: Rules):
    """``fn`` traced under ``activation_context(mesh, rules)``."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_context(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of ``abstract_tree`` laid out by ``shardings`` (the largest shard)."""
    leaves = jax.tree.leaves(abstract_tree)
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    total = 0
    for leaf, s in zip(leaves, shard_leaves):
        if not hasattr(leaf, "shape"):
            continue
        shape = s.shard_shape(leaf.shape) if isinstance(s, NamedSharding) else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch(global_batch: int, mesh, what: str = "config.batch_size") -> None:
    n = data_parallel_size(mesh)
    if global_batch % n:
        sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
        raise ConfigError(
            f"{what}={global_batch} does not divide over the {n} data-parallel devices "
            f"(mesh axes {BATCH_AXES}: {sizes}); use a multiple of {n}.")


def check_batch_arrays(batch: dict, mesh, axis: int = 0) -> None:
    """Every array of a batch must split over the data-parallel devices along ``axis``."""
    n = data_parallel_size(mesh)
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if np.ndim(x) > axis and np.shape(x)[axis] % n:
            raise _divisibility_error(f"Batch array {jax.tree_util.keystr(path)}", np.shape(x),
                                      axis, BATCH_AXES, dict(mesh.shape))


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
