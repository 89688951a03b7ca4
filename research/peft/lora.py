"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024) as transforms of a
pure Flax apply function and of the parameter pytree; the model's code is not touched.

Target kernels are chosen by regexes (``re.search``) over parameter paths such as
``layer_0/attn/query/kernel``. ``find_targets`` runs the model once abstractly
(``jax.eval_shape``) under ``flax.linen.intercept_methods`` and records, for every ``nn.Dense`` /
``nn.DenseGeneral`` whose kernel matches, the kernel shape and how many leading kernel axes are
contracted with the input (``n_in``). A kernel W [*in, *out] gets ``lora_a`` [*in, r] (Kaiming-
uniform, as the paper's reference code) and ``lora_b`` [r, *out] (zeros, so step 0 equals the base
model exactly), and for DoRA ``magnitude`` [*out] (the column norms of W). The adapters are a
nested dict keyed by the layer's module path: ``{'layer_0': {'attn': {'query': {'lora_a', ...}}}}``.

``apply(fn, adapters, cfg, rng)`` runs ``fn`` (any function calling ``module.apply``) with every
targeted layer's output replaced by

    y = base(x) + s * dropout(x) @ A @ B,          s = alpha / r  (rsLoRA: alpha / sqrt(r))
    DoRA: y = base(x) + (f - 1) * (base(x) - b) + f * s * dropout(x) @ A @ B,
          f = m / ||W + s A B||_c  (column norm, treated as a constant in the backward pass, DoRA
          section 4.3), which equals  m * (W + s A B) / ||.||_c  applied to x, plus the bias b.

``merge`` folds the adapters into the kernels (zero extra latency at inference), ``unmerge``
subtracts them again (plain LoRA; DoRA's normalisation cannot be undone without the base).
``save`` / ``load`` write only the adapters and the LoRA config (an ``.npz`` of a few KB), and
``check_compatible`` refuses adapters made for a base of another shape, naming the tensor.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from research.core.config import ConfigError

ADAPTER_KEYS = ("lora_a", "lora_b", "magnitude")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rules: tuple[str, ...] = (r"attn/(query|value)/kernel$",)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False     # scale alpha / sqrt(rank) instead of alpha / rank
    dora: bool = False       # weight-decomposed LoRA: a learned magnitude per output feature

    def __post_init__(self):
        rules = (self.rules,) if isinstance(self.rules, str) else tuple(self.rules)
        object.__setattr__(self, "rules", rules)
        if not rules:
            raise ConfigError("LoRA needs at least one rule (a regex over parameter paths).")
        for r in rules:
            try:
                re.compile(r)
            except re.error as e:
                raise ConfigError(f"LoRA rule {r!r} is not a valid regex: {e}") from None
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ConfigError(f"LoRA rank={self.rank!r}: expected a positive integer.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout={self.dropout!r}: expected a value in [0, 1).")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "LoraConfig":
        d = json.loads(s)
        d["rules"] = tuple(d["rules"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Target:
    kernel_shape: tuple[int, ...]
    n_in: int                       # leading kernel axes contracted with the input

    @property
    def in_shape(self):
        return self.kernel_shape[:self.n_in]

    @property
    def out_shape(self):
        return self.kernel_shape[self.n_in:]


def path_str(path: Sequence) -> str:
    """A pytree key path -> 'layer_0/attn/query/kernel' (Flax box ``.value`` attributes dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
    return "/".join(parts)


def param_paths(params) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def _dense_n_in(module) -> int | None:
    """Contracted input axes of a Dense/DenseGeneral, or None for other modules."""
    if isinstance(module, nn.Dense):
        return 1
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ConfigError(f"LoRA does not support DenseGeneral with batch_dims "
                              f"({'/'.join(module.path)}).")
        axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
        return len(axis)
    return None


def find_targets(forward: Callable[[Any], Any], params, rules: Sequence[str]) -> dict[str, Target]:
    """Module path -> ``Target`` for every Dense/DenseGeneral layer whose kernel path matches one
    of ``rules``. ``forward(params)`` must run the model (it is traced with ``jax.eval_shape``)."""
    rules = (rules,) if isinstance(rules, str) else tuple(rules)
    paths = param_paths(params)
    matched = [p for p in paths if any(re.search(r, p) for r in rules)]
    if not matched:
        raise ConfigError(f"LoRA rules {list(rules)} match no parameter. The parameter paths are:\n  "
                          + "\n  ".join(paths))
    found: dict[str, Target] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__":
            n_in = _dense_n_in(module)
            if n_in is not None:
                name = "/".join(module.path)
                if _join(name, "kernel") in matched:
                    kernel = module.variables["params"]["kernel"]
                    found[name] = Target(tuple(kernel.shape), n_in)
        return next_fun(*args, **kwargs)

    def run(p):
        with nn.intercept_methods(record):
            return forward(p)

    jax.eval_shape(run, params)
    not_dense = [p for p in matched if p.rpartition("/")[0] not in found or
                 not p.endswith("kernel")]
    if not_dense:
        raise ConfigError(f"LoRA rules {list(rules)} match {not_dense}, which are not kernels of "
                          "nn.Dense / nn.DenseGeneral layers called by the model; narrow the rules "
                          "(e.g. r'attn/(query|value)/kernel$').")
    return found


def _join(name: str, leaf: str) -> str:
    return f"{name}/{leaf}" if name else leaf


def init(rng, targets: dict[str, Target], cfg: LoraConfig, params=None, kernel_names=None):
    """Adapters for ``targets``. ``params`` (the base, needed for DoRA's magnitudes) and
    ``kernel_names`` (module path -> the kernel's logical axis names: the adapters are then
    ``nn.LogicallyPartitioned`` with matching names, so they shard like their kernels)."""
    flat = {}
    for i, (name, t) in enumerate(sorted(targets.items())):
        n_in, n_out = math.prod(t.in_shape), math.prod(t.out_shape)
        if cfg.rank > min(n_in, n_out):
            raise ConfigError(f"LoRA rank={cfg.rank} exceeds the dimensions of {name}/kernel "
                              f"{t.kernel_shape} (in {n_in}, out {n_out}); use rank <= "
                              f"{min(n_in, n_out)}.")
        # Kaiming-uniform with a = sqrt(5) on A (PyTorch nn.Linear's default, used by loralib
        # and peft): bound = 1 / sqrt(fan_in).
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (n_in, cfg.rank), jnp.float32,
                               -bound, bound).reshape(*t.in_shape, cfg.rank)
        leaves = {"lora_a": a, "lora_b": jnp.zeros((cfg.rank, *t.out_shape), jnp.float32)}
        if cfg.dora:
            if params is None:
                raise ValueError("DoRA's init needs the base params (for the magnitudes).")
            leaves["magnitude"] = column_norm(_kernel(params, name), t.n_in)
        names = None if kernel_names is None else kernel_names.get(name)
        for k, v in leaves.items():
            if names is not None:
                axes = {"lora_a": tuple(names[:t.n_in]) + (None,),
                        "lora_b": (None,) + tuple(names[t.n_in:]),
                        "magnitude": tuple(names[t.n_in:])}[k]
                v = nn.LogicallyPartitioned(v, axes)
            flat[_join(name, k)] = v
    return traverse_util.unflatten_dict(flat, sep="/")


def column_norm(w: jax.Array, n_in: int) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=tuple(range(n_in))))


def _kernel(params, name: str):
    node = params
    for part in name.split("/"):
        node = node[part]
    k = node["kernel"]
    return k.value if isinstance(k, nn.LogicallyPartitioned) else k


def by_layer(adapters) -> dict[str, dict[str, jax.Array]]:
    """{'layer_0/attn/query': {'lora_a': ..., 'lora_b': ...}, ...}"""
    flat = traverse_util.flatten_dict(adapters, sep="/")
    out: dict[str, dict] = {}
    for key, v in flat.items():
        name, _, leaf = key.rpartition("/")
        if leaf not in ADAPTER_KEYS:
            raise ValueError(f"Not a LoRA adapter tree: unexpected leaf {key!r}.")
        out.setdefault(name, {})[leaf] = v
    return out


def delta(ad: dict, scale: float) -> jax.Array:
    """s * A @ B in the kernel's layout [*in, *out]."""
    return scale * jnp.tensordot(ad["lora_a"], ad["lora_b"], axes=1)


def apply(fn: Callable[..., Any], adapters, cfg: LoraConfig, rng=None) -> Callable[..., Any]:
    """``fn`` (a function running ``module.apply``) with the adapters added to their layers.
    ``rng``: the adapter-dropout key (None = no dropout, e.g. at evaluation)."""
    layers = by_layer(adapters)
    scale = cfg.scale

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or _dense_n_in(module) is None:
            return next_fun(*args, **kwargs)
        name = "/".join(module.path)
        ad = layers.get(name)
        if ad is None:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        n_in = ad["lora_a"].ndim - 1
        if cfg.dropout > 0.0 and rng is not None:
            key = jax.random.fold_in(rng, zlib.crc32(name.encode()))
            keep = jax.random.bernoulli(key, 1.0 - cfg.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - cfg.dropout), 0.0).astype(x.dtype)
        dt = y.dtype
        h = jnp.tensordot(x.astype(dt), ad["lora_a"].astype(dt), axes=n_in)
        d = scale * jnp.tensordot(h, ad["lora_b"].astype(dt), axes=1)
        if not cfg.dora:
            return y + d
        p = module.variables["params"]
        v = p["kernel"].astype(jnp.float32) + delta(ad, scale)
        f = ad["magnitude"] / jax.lax.stop_gradient(column_norm(v, n_in))
        f = f.astype(dt)
        base = y - p["bias"].astype(dt) if "bias" in p else y
        return y + (f - 1) * base + f * d

    def wrapped(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return fn(*args, **kwargs)

    return wrapped


def _map_kernels(params, adapters, f):
    layers = by_layer(adapters)
    done = set()

    def g(path, x):
        p = path_str(path)
        name, _, leaf = p.rpartition("/")
        if leaf == "kernel" and name in layers:
            done.add(name)
            return f(x, layers[name]).astype(x.dtype)
        return x

    out = jax.tree_util.tree_map_with_path(g, params)
    missing = sorted(set(layers) - done)
    if missing:
        raise ConfigError(f"LoRA adapters for {missing} have no kernel in the base params.")
    return out


def merge(params, adapters, cfg: LoraConfig):
    """Base params with the adapters folded into the kernels: W + s A B (DoRA: m (W + s A B) /
    ||W + s A B||_c). The result runs with the plain model at the base model's cost."""
    def f(w, ad):
        n_in = ad["lora_a"].ndim - 1
        v = w.astype(jnp.float32) + delta(ad, cfg.scale)
        return ad["magnitude"] * v / column_norm(v, n_in) if cfg.dora else v
    return _map_kernels(params, adapters, f)


def unmerge(merged, adapters, cfg: LoraConfig):
    """The base params back from merged ones: W' - s A B (equal up to rounding)."""
    if cfg.dora:
        raise NotImplementedError("DoRA's column normalisation cannot be undone from merged "
                                  "weights alone; keep the base params (or merge a copy).")
    return _map_kernels(merged, adapters, lambda w, ad: w.astype(jnp.float32) - delta(ad, cfg.scale))


def count(adapters) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def check_compatible(adapters, params) -> None:
    """Raise a ConfigError naming the tensor if an adapter does not fit the base ``params``."""
    kernels = {path_str(p).rpartition("/")[0]: tuple(x.shape)
               for p, x in jax.tree_util.tree_leaves_with_path(params)
               if path_str(p).endswith("/kernel")}
    for name, ad in by_layer(adapters).items():
        if name not in kernels:
            raise ConfigError(f"Adapter {name}/lora_a has no kernel {name}/kernel in the base "
                              f"model; base kernels: {sorted(kernels)}")
        a, b = ad["lora_a"].shape, ad["lora_b"].shape
        shape = tuple(a[:-1]) + tuple(b[1:])
        if shape != kernels[name] or a[-1] != b[0]:
            raise ConfigError(
                f"Adapter {name}/lora_a {tuple(a)} x lora_b {tuple(b)} (a kernel of shape {shape}) "
                f"does not fit the base tensor {name}/kernel of shape {kernels[name]}: the adapter "
                "was trained on a base model of another shape.")
        if "magnitude" in ad and tuple(ad["magnitude"].shape) != tuple(b[1:]):
            raise ConfigError(f"Adapter {name}/magnitude {tuple(ad['magnitude'].shape)} does not "
                              f"match {name}/kernel {kernels[name]}.")


def save(path: str, adapters, cfg: LoraConfig) -> int:
    """Write only the adapters and the LoRA config to ``path`` (``.npz``); returns its size."""
    import os
    flat = {k: np.asarray(jax.device_get(v)) for k, v in
            traverse_util.flatten_dict(nn.meta.unbox(adapters), sep="/").items()}
    with open(path, "wb") as f:
        np.savez(f, __lora_config__=np.array(cfg.to_json()), **flat)
    return os.path.getsize(path)


def load(path: str, params=None):
    """Read ``(adapters, cfg)`` from ``save``'s file; with the base ``params`` also check that
    they fit it (``check_compatible``)."""
    with np.load(path) as z:
        cfg = LoraConfig.from_json(str(z["__lora_config__"]))
        flat = {k: jnp.asarray(z[k]) for k in z.files if k != "__lora_config__"}
    adapters = traverse_util.unflatten_dict(flat, sep="/")
    if params is not None:
        check_compatible(adapters, nn.meta.unbox(params))
    return adapters, cfg
