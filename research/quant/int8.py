"""int8 quantization for inference: weight-only per-channel absmax, and LLM.int8()'s mixed-precision
decomposition (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339).

Weight-only (``quantize_tree`` / ``dequantize_tree``): each kernel W [*in, *out] is stored as int8
``round(127 * W / s)`` with one float32 scale ``s = max |W[..., j]|`` per output channel j.

LLM.int8() (``llm_int8_apply``): a transform of the apply function that intercepts every targeted
``nn.Dense`` / ``nn.DenseGeneral`` call and computes ``x @ W`` as
    x[:, O] @ W[O, :]                                     (outlier input features, float)
  + (s_x s_w^T / 127^2) * (int8(x[:, ~O]) @ int8(W[~O, :]))  (int32 accumulation)
where O = {input features c : max_n |x[n, c]| >= threshold} (the paper's 6.0), x is quantized
row-wise (vector-wise absmax per token) and W column-wise (per output channel, over the non-outlier
rows). With ``threshold=inf`` it is plain vector-wise int8 (absmax) matrix multiplication.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from research.core.config import ConfigError
from research.peft.lora import _dense_n_in, param_paths, path_str


@flax.struct.dataclass
class Int8Tensor:
    q: jax.Array            # int8, the kernel's shape
    scale: jax.Array        # float32 [*out]: absmax per output channel
    n_in: int = flax.struct.field(pytree_node=False, default=1)

    def nbytes(self) -> int:
        return int(self.q.size) + 4 * int(self.scale.size)


def is_int8(x) -> bool:
    return isinstance(x, Int8Tensor)


def quantize(w: jax.Array, n_in: int = 1) -> Int8Tensor:
    axes = tuple(range(n_in))
    scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes)
    q = jnp.round(127.0 * w / jnp.where(scale == 0, 1.0, scale))
    return Int8Tensor(jnp.clip(q, -127, 127).astype(jnp.int8), scale.astype(jnp.float32), n_in)


def dequantize(t: Int8Tensor, dtype=jnp.float32) -> jax.Array:
    return (t.q.astype(jnp.float32) * (t.scale / 127.0)).astype(dtype)


def quantize_tree(params, rules: Sequence[str] | str = (r"kernel$",), n_in: dict | None = None):
    """Int8 per-output-channel quantization of the arrays whose path matches ``rules``;
    ``n_in``: path -> contracted input axes (default 1; DenseGeneral 'out' kernels [H, D, E]
    have 2, see ``research.peft.lora.find_targets``)."""
    rules = (rules,) if isinstance(rules, str) else tuple(rules)
    n_in = n_in or {}
    hit = []

    def f(path, x):
        p = path_str(path)
        if x.ndim >= 2 and any(re.search(r, p) for r in rules):
            hit.append(p)
            return quantize(x, n_in.get(p, 1))
        return x

    out = jax.tree_util.tree_map_with_path(f, params)
    if not hit:
        raise ConfigError(f"int8 rules {list(rules)} match no parameter; the paths are:\n  "
                          + "\n  ".join(param_paths(params)))
    return out


def dequantize_tree(tree, dtype=jnp.float32):
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_int8(x) else x, tree, is_leaf=is_int8)


def int8_matmul(x: jax.Array, w: jax.Array, threshold: float = 6.0):
    """LLM.int8() product of x [N, I] and w [I, O] (float32 result) and the fraction of input
    features treated as outliers."""
    x = x.astype(jnp.float32)
    w = w.astype(jnp.float32)
    outlier = jnp.max(jnp.abs(x), axis=0) >= threshold                    # [I]
    x_reg = jnp.where(outlier[None, :], 0.0, x)
    w_reg = jnp.where(outlier[:, None], 0.0, w)
    sx = jnp.max(jnp.abs(x_reg), axis=1, keepdims=True)                   # [N, 1]
    sw = jnp.max(jnp.abs(w_reg), axis=0, keepdims=True)                   # [1, O]
    qx = jnp.round(127.0 * x_reg / jnp.where(sx == 0, 1.0, sx)).astype(jnp.int8)
    qw = jnp.round(127.0 * w_reg / jnp.where(sw == 0, 1.0, sw)).astype(jnp.int8)
    acc = jax.lax.dot(qx, qw, preferred_element_type=jnp.int32)
    regular = acc.astype(jnp.float32) * (sx * sw) / (127.0 * 127.0)
    high = jnp.where(outlier[None, :], x, 0.0) @ jnp.where(outlier[:, None], w, 0.0)
    return regular + high, jnp.mean(outlier.astype(jnp.float32))


def llm_int8_apply(fn: Callable[..., Any], threshold: float = 6.0,
                   rules: Sequence[str] | str = (r".*",), stats: list | None = None):
    """``fn`` with every Dense/DenseGeneral whose module path matches ``rules`` computed by
    ``int8_matmul``. ``stats`` (a list) collects (path, outlier fraction) per call."""
    rules = (rules,) if isinstance(rules, str) else tuple(rules)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        n_in = _dense_n_in(module) if context.method_name == "__call__" else None
        name = "/".join(module.path)
        if n_in is None or not any(re.search(r, name) for r in rules):
            return next_fun(*args, **kwargs)
        p = module.variables["params"]
        kernel = p["kernel"]
        x = args[0] if args else kwargs["inputs"]
        in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
        lead = x.shape[:x.ndim - n_in]
        y, frac = int8_matmul(x.reshape(-1, math.prod(in_shape)),
                              kernel.reshape(math.prod(in_shape), -1), threshold)
        if stats is not None:
            stats.append((name, frac))
        y = y.reshape(*lead, *out_shape)
        if "bias" in p:
            y = y + p["bias"]
        return y.astype(module.dtype or x.dtype)

    def wrapped(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return fn(*args, **kwargs)

    return wrapped


def nbytes(tree: Any) -> int:
    """Bytes of a tree with Int8Tensor leaves (and plain arrays)."""
    total = 0
    for x in jax.tree.leaves(tree, is_leaf=is_int8):
        total += x.nbytes() if is_int8(x) else int(x.size) * x.dtype.itemsize
    return total
