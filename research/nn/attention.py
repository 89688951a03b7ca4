"""Causal multi-head attention with an explicit, pure key/value cache.

The cache is a plain dict ``{'k': [B, S, H, D], 'v': [B, S, H, D]}`` passed in and returned,
so decoding stays a pure function (no mutable Flax collections). ``index`` is the position of
the first new token; the new keys/values are written at ``[index, index + T)`` and queries attend
to every cached position ``<=`` their own.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.nn.layers import logical, normal_init

Dtype = Any
Cache = dict[str, jax.Array]


def init_cache(batch: int, max_len: int, num_heads: int, head_dim: int, dtype: Dtype) -> Cache:
    shape = (batch, max_len, num_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def causal_mask(q_len: int, k_len: int, q_offset: jax.Array | int = 0) -> jax.Array:
    """[q_len, k_len] boolean mask: query i (at absolute position q_offset + i) sees keys <= it."""
    q_pos = q_offset + jnp.arange(q_len)[:, None]
    return jnp.arange(k_len)[None, :] <= q_pos


def dot_product_attention(q, k, v, mask, *, dropout_rate=0.0, dropout_rng=None, dtype=jnp.float32):
    """softmax(q k^T / sqrt(d)) v with a boolean mask; logits and softmax in float32.

    q: [B, T, H, D], k/v: [B, S, H, D], mask: broadcastable to [B, H, T, S].
    """
    scale = 1.0 / jnp.sqrt(q.shape[-1]).astype(dtype)
    logits = jnp.einsum("bthd,bshd->bhts", q * scale, k).astype(jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0).astype(dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; separate query/key/value kernels [embed, heads, kv]."""

    num_heads: int
    head_dim: int
    dropout: float = 0.0
    use_bias: bool = True
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, cache: Cache | None = None, index=None, deterministic: bool = True):
        embed_dim = x.shape[-1]
        proj = lambda name: nn.DenseGeneral(  # noqa: E731
            features=(self.num_heads, self.head_dim),
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=logical(normal_init(self.init_std), ("embed", "heads", "kv")),
            bias_init=logical(nn.initializers.zeros, ("heads", "kv")),
            name=name,
        )
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        t = x.shape[1]
        if cache is None:
            mask = causal_mask(t, t)
            new_cache = None
        else:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            new_cache = {"k": k, "v": v}
            mask = causal_mask(t, k.shape[1], index)
        use_dropout = self.dropout > 0.0 and not deterministic
        out = dot_product_attention(
            q, k.astype(self.dtype), v.astype(self.dtype), mask,
            dropout_rate=self.dropout if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            dtype=self.dtype,
        )
        out = nn.DenseGeneral(
            features=embed_dim,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=logical(normal_init(self.out_init_std), ("heads", "kv", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out)
        return out, new_cache
