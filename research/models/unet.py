"""A U-Net denoiser (DDPM / ADM style) for small images, conditioned on time and on a sequence.

- Residual blocks: GroupNorm -> SiLU -> 3x3 conv, plus a projection of the time embedding (added
  per channel), GroupNorm -> SiLU -> dropout -> 3x3 conv (zero-initialised), and a 1x1 skip when
  the width changes.
- At the resolutions in ``attn_resolutions``: a self-attention block over the H*W positions and,
  when a conditioning sequence is given, a cross-attention block to it (Stable Diffusion's
  ``SpatialTransformer`` in its simplest form), both pre-norm residual.
- Encoder levels halve the resolution with a stride-2 conv, the decoder doubles it with nearest
  upsampling + conv, and every encoder activation is concatenated into the matching decoder block
  (skip connections). 28 x 28 inputs go 28 -> 14 -> 7 with ``channel_mults`` of length 3.
- Conditioning: ``labels`` [B] (class ids; the id ``num_classes`` is the "null" class used for
  classifier-free guidance) become one context token each, and/or ``context`` [B, S, D] (e.g. text
  embeddings). The mean context token is also added to the time embedding (as GLIDE adds its
  pooled text embedding), so even a U-Net without attention at a level sees the condition.

Inputs and outputs are NHWC. Used only through pure ``init``/``apply``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.nn.attention import MultiHeadAttention


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    out_channels: int | None = None          # None = in_channels
    image_size: int = 28
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 4
    groups: int = 8
    dropout: float = 0.0
    num_classes: int | None = None           # class conditioning (+1 null class); None = off
    context_dim: int = 64                    # width of the conditioning tokens
    dtype: str = "float32"                   # compute dtype; parameters stay float32

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for m in self.channel_mults:
            if (self.base_channels * m) % self.groups:
                raise ValueError(f"unet: base_channels * mult = {self.base_channels * m} must divide "
                                 f"by groups={self.groups} (GroupNorm)")
            if (self.base_channels * m) % self.num_heads:
                raise ValueError(f"unet: width {self.base_channels * m} must divide by "
                                 f"num_heads={self.num_heads}")
        size = self.image_size
        for _ in self.channel_mults[:-1]:
            if size % 2:
                raise ValueError(f"unet: image_size={self.image_size} cannot be halved "
                                 f"{len(self.channel_mults) - 1} times exactly; use fewer "
                                 "channel_mults or pad the images")
            size //= 2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown U-Net config keys {unknown}; known: {sorted(names)}")
        return cls(**{**dict(d), **overrides})

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] of (float or int) timesteps t [B] (as in DDPM / ADM)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResBlock(nn.Module):
    out_ch: int
    groups: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x, emb, deterministic: bool):
        h = nn.silu(nn.GroupNorm(self.groups, dtype=self.dtype, name="norm1")(x))
        h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv1")(h)
        h = h + nn.Dense(self.out_ch, dtype=self.dtype, name="emb")(nn.silu(emb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.groups, dtype=self.dtype, name="norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over the positions, then (given a context) cross-attention to it."""
    num_heads: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x, context=None):
        b, h, w, c = x.shape
        mha = lambda name: MultiHeadAttention(  # noqa: E731
            num_heads=self.num_heads, head_dim=c // self.num_heads, causal=False,
            out_init_std=0.0, dtype=self.dtype, name=name)
        seq = nn.GroupNorm(self.groups, dtype=self.dtype, name="norm")(x).reshape(b, h * w, c)
        out = x.reshape(b, h * w, c) + mha("self_attn")(seq)[0]
        if context is not None:
            q = nn.LayerNorm(dtype=self.dtype, name="cross_norm")(out)
            out = out + mha("cross_attn")(q, context=context.astype(self.dtype))[0]
        return out.reshape(b, h, w, c)


class UNet(nn.Module):
    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, labels: jax.Array | None = None,
                 context: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        dt = cfg.compute_dtype
        if x.ndim != 4 or x.shape[1] != cfg.image_size or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet input shape {x.shape}: expected [B, {cfg.image_size}, "
                             f"{cfg.image_size}, {cfg.in_channels}]")
        ch = cfg.base_channels
        emb_dim = 4 * ch
        emb = timestep_embedding(t, ch)
        emb = nn.Dense(emb_dim, name="time_mlp1")(emb)
        emb = nn.Dense(emb_dim, name="time_mlp2")(nn.silu(emb))

        tokens = []
        if cfg.num_classes is not None:
            if labels is None:
                raise ValueError("This U-Net is class-conditional: pass labels (num_classes = the "
                                 "null class for unconditional)")
            table = nn.Embed(cfg.num_classes + 1, cfg.context_dim, name="class_embed",
                             embedding_init=nn.initializers.normal(1.0))
            tokens.append(table(labels)[:, None, :])
        if context is not None:
            tokens.append(nn.Dense(cfg.context_dim, name="context_proj")(context))
        ctx = jnp.concatenate(tokens, axis=1) if tokens else None
        if ctx is not None:
            emb = emb + nn.Dense(emb_dim, name="context_to_emb")(ctx.mean(axis=1))

        h = nn.Conv(ch, (3, 3), dtype=dt, name="conv_in")(x.astype(dt))
        skips = [h]
        res = cfg.image_size
        blocks = lambda out, name: ResBlock(out, cfg.groups, cfg.dropout, dt, name=name)  # noqa: E731
        attn = lambda name: AttnBlock(cfg.num_heads, cfg.groups, dt, name=name)  # noqa: E731
        for level, mult in enumerate(cfg.channel_mults):
            for i in range(cfg.num_res_blocks):
                h = blocks(ch * mult, f"down{level}_res{i}")(h, emb, deterministic)
                if res in cfg.attn_resolutions:
                    h = attn(f"down{level}_attn{i}")(h, ctx)
                skips.append(h)
            if level < len(cfg.channel_mults) - 1:
                h = nn.Conv(ch * mult, (3, 3), strides=(2, 2), dtype=dt, name=f"down{level}_pool")(h)
                res //= 2
                skips.append(h)

        mid = ch * cfg.channel_mults[-1]
        h = blocks(mid, "mid_res1")(h, emb, deterministic)
        h = attn("mid_attn")(h, ctx)
        h = blocks(mid, "mid_res2")(h, emb, deterministic)

        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = blocks(ch * mult, f"up{level}_res{i}")(h, emb, deterministic)
                if res in cfg.attn_resolutions:
                    h = attn(f"up{level}_attn{i}")(h, ctx)
            if level > 0:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, hh * 2, ww * 2, c), "nearest")
                h = nn.Conv(c, (3, 3), dtype=dt, name=f"up{level}_upsample")(h)
                res *= 2
        assert not skips
        h = nn.silu(nn.GroupNorm(cfg.groups, dtype=dt, name="norm_out")(h))
        out = nn.Conv(cfg.out_channels or cfg.in_channels, (3, 3), dtype=dt,
                      kernel_init=nn.initializers.zeros, name="conv_out")(h)
        return out.astype(jnp.float32)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
