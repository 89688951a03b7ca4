"""Multi-head attention (causal or bidirectional self-attention, cross-attention) with an
explicit, pure key/value cache.

The cache is a plain dict ``{'k': [B, S, K, D], 'v': [B, S, K, D]}`` (K key/value heads) passed
in and returned, so decoding stays a pure function (no mutable Flax collections). ``index`` is the
position of the first new token; the new keys/values are written at ``[index, index + T)`` and
queries attend to every cached position ``<=`` their own.

Options for LLaMA-style models: grouped-query attention (``num_kv_heads`` key/value heads shared
by groups of ``num_heads // num_kv_heads`` query heads; the cache holds only the KV heads), rotary
position embeddings (``positions='rope'``, HF/LLaMA "rotate_half" layout) and ALiBi linear biases
(``positions='alibi'``). Positions are absolute (``index + t``), so the cached decode path agrees
with the full forward.

The same module serves encoders (``causal=False`` with a padding ``mask``) and encoder-decoder
cross-attention (``context=``: keys/values from the encoder output, ``mask`` over its padding).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.core.sharding import constrain
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


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding of x [B, T, H, D] at absolute ``positions`` [T], in the HF/LLaMA
    "rotate_half" layout (dimension i pairs with i + D/2), computed in float32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]      # [1, T, 1, D]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ... for a
    power-of-two n heads; otherwise those of the closest lower power of two, then every other slope
    of twice that (the paper's reference implementation)."""
    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def alibi_bias(num_heads: int, q_positions: jax.Array, k_len: int) -> jax.Array:
    """[H, T, S] float32 biases slope_h * (key_pos - query_pos) (<= 0 where the mask allows)."""
    slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
    dist = jnp.arange(k_len)[None, :] - q_positions[:, None]
    return slopes[:, None, None] * dist.astype(jnp.float32)[None]


def dot_product_attention(q, k, v, mask, *, bias=None, dropout_rate=0.0, dropout_rng=None,
                          dtype=jnp.float32, impl: str = "xla", causal: bool = False):
    """softmax(q k^T / sqrt(d) + bias) v with a boolean mask; logits and softmax in float32.

    q: [B, T, H, D], k/v: [B, S, K, D] with K dividing H (grouped-query attention: query head h
    uses key/value head h // (H // K)), mask: broadcastable to [B, H, T, S] (or None), bias:
    optional float broadcastable to [B, H, T, S].

    ``impl`` other than 'xla' (this naive path) hands over to ``research.nn.flash`` ('blockwise',
    'cudnn', 'pallas'), with ``causal`` applied inside it (no [T, S] mask needed); those take no
    ``bias`` or dropout.
    """
    if impl != "xla":
        from research.nn import flash
        if bias is not None or dropout_rate > 0.0:
            from research.core.config import ConfigError
            raise ConfigError(f"config.model.attention_impl={impl!r} supports neither ALiBi biases "
                              "nor attention dropout; use attention_impl='xla' for those.")
        return flash.attention(q, k, v, mask, causal=causal, impl=impl, dtype=dtype)
    if mask is None:
        mask = jnp.ones((), bool)
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / jnp.sqrt(d).astype(dtype)
    if groups == 1:
        logits = jnp.einsum("bthd,bshd->bhts", q * scale, k).astype(jnp.float32)
    else:
        qg = (q * scale).reshape(b, t, k.shape[2], groups, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32)
        logits = logits.reshape(b, h, t, k.shape[1])
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0).astype(dtype)
    if groups == 1:
        return jnp.einsum("bhts,bshd->bthd", probs, v)
    probs = probs.reshape(b, k.shape[2], groups, t, k.shape[1])
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


class MultiHeadAttention(nn.Module):
    """Multi-head attention; separate query/key/value kernels [embed, heads, kv] (key/value with
    ``num_kv_heads`` heads). ``positions``: None (the caller adds positions to the input), 'rope'
    (rotary, applied to q and k) or 'alibi' (linear biases on the logits).

    ``causal``: each query sees only keys at positions <= its own (decoders); ``False`` for
    encoders. ``mask``: an extra boolean mask broadcastable to [B, H, T, S] (True = attend), e.g.
    ``padding[:, None, None, :]``, ANDed with the causal mask. ``context`` [B, S, E']: cross-
    attention, keys and values from ``context`` (no positions, not causal, no cache)."""

    num_heads: int
    head_dim: int
    dropout: float = 0.0
    use_bias: bool = True
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Dtype = jnp.float32
    num_kv_heads: int | None = None
    positions: str | None = None
    rope_theta: float = 10000.0
    causal: bool = True
    attention_impl: str = "xla"  # 'xla' (naive) | 'blockwise' | 'cudnn' | 'pallas' (research.nn.flash)

    @nn.compact
    def __call__(self, x, *, cache: Cache | None = None, index=None, deterministic: bool = True,
                 mask: jax.Array | None = None, context: jax.Array | None = None):
        embed_dim = x.shape[-1]
        num_kv_heads = self.num_kv_heads or self.num_heads
        # Key/value heads have their own logical axis ('kv_heads'): under tensor parallelism a
        # GQA model's num_kv_heads must divide by the tensor size on its own.
        proj = lambda name, heads, axis="heads": nn.DenseGeneral(  # noqa: E731
            features=(heads, self.head_dim),
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=logical(normal_init(self.init_std), ("embed", axis, "kv")),
            bias_init=logical(nn.initializers.zeros, (axis, "kv")),
            name=name,
        )
        cross = context is not None
        if cross and cache is not None:
            raise ValueError("Cross-attention takes no KV cache (its keys come from `context`).")
        q = proj("query", self.num_heads)(x)
        kv_in = context if cross else x
        k, v = proj("key", num_kv_heads, "kv_heads")(kv_in), proj("value", num_kv_heads, "kv_heads")(kv_in)
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_kv"), "query")
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_kv"), "key")
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", "act_kv"), "value")
        t = x.shape[1]
        q_positions = jnp.arange(t) if cache is None else index + jnp.arange(t)
        if self.positions == "rope" and not cross:
            q = rope(q, q_positions, self.rope_theta)
            k = rope(k, q_positions, self.rope_theta)
        new_cache = None
        if cache is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            new_cache = {"k": k, "v": v}
        s = k.shape[1]
        if self.causal and not cross:
            attn_mask = causal_mask(t, s, 0 if cache is None else index)
        elif cache is not None:  # bidirectional over the filled part of the cache
            attn_mask = jnp.broadcast_to(jnp.arange(s)[None, :] < index + t, (t, s))
        else:
            attn_mask = jnp.ones((t, s), bool)
        if mask is not None:
            attn_mask = jnp.logical_and(attn_mask, mask)
        bias = None
        if self.positions == "alibi" and not cross:
            bias = alibi_bias(self.num_heads, q_positions, s)
            if not self.causal:  # symmetric distances for bidirectional ALiBi
                bias = -jnp.abs(bias)
        use_dropout = self.dropout > 0.0 and not deterministic
        if self.attention_impl != "xla" and cache is None:
            # Fused/blockwise kernels apply the causal mask themselves: only the padding mask.
            attn_mask, causal_arg = mask, self.causal and not cross
        else:
            causal_arg = False
        out = dot_product_attention(
            q, k.astype(self.dtype), v.astype(self.dtype), attn_mask, bias=bias,
            dropout_rate=self.dropout if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            dtype=self.dtype, impl=self.attention_impl if cache is None else "xla",
            causal=causal_arg,
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


# The decoder's name for it (causal is the default).
CausalSelfAttention = MultiHeadAttention
