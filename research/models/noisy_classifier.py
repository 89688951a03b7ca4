"""A noise-aware image classifier ``log p(y | x_t, t)`` for classifier guidance (Dhariwal & Nichol
2021): the encoder half of ``research.models.unet.UNet`` with a pooled linear head, as ADM's
classifier (which pools with attention; here a global mean).

The layers are the U-Net's own (``timestep_embedding``, ``ResBlock``, ``AttnBlock``): a sinusoidal
time embedding through a 2-layer MLP, ``conv_in``, per level ``num_res_blocks`` residual blocks
(+ self-attention at ``attn_resolutions``) and a stride-2 conv between levels (28 -> 14 -> 7), one
middle residual block, GroupNorm -> SiLU -> mean over positions -> Dense logits [B, num_classes].
Inputs are NHWC images in the diffusion model's range ([-1, 1] at t = 0) and int timesteps [B].
Used only through pure ``init``/``apply``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.unet import AttnBlock, ResBlock, UNetConfig, timestep_embedding


@dataclasses.dataclass(frozen=True)
class NoisyClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    num_heads: int = 4
    groups: int = 8
    dropout: float = 0.0
    num_classes: int = 10
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"noisy classifier: num_classes={self.num_classes!r}: expected >= 2")
        # The U-Net's checks (GroupNorm / head divisibility, exact halving) apply unchanged.
        UNetConfig(in_channels=self.in_channels, image_size=self.image_size,
                   base_channels=self.base_channels, channel_mults=self.channel_mults,
                   num_heads=self.num_heads, groups=self.groups)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> "NoisyClassifierConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown noisy classifier config keys {unknown}; known: "
                             f"{sorted(names)}")
        return cls(**{**dict(d), **overrides})


class NoisyClassifier(nn.Module):
    config: NoisyClassifierConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        if x.ndim != 4 or x.shape[1] != cfg.image_size or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"NoisyClassifier input shape {x.shape}: expected [B, "
                             f"{cfg.image_size}, {cfg.image_size}, {cfg.in_channels}]")
        ch = cfg.base_channels
        emb = nn.Dense(4 * ch, name="time_mlp1")(timestep_embedding(t, ch))
        emb = nn.Dense(4 * ch, name="time_mlp2")(nn.silu(emb))
        h = nn.Conv(ch, (3, 3), dtype=dt, name="conv_in")(x.astype(dt))
        res = cfg.image_size
        for level, mult in enumerate(cfg.channel_mults):
            for i in range(cfg.num_res_blocks):
                h = ResBlock(ch * mult, cfg.groups, cfg.dropout, dt,
                             name=f"down{level}_res{i}")(h, emb, deterministic)
                if res in cfg.attn_resolutions:
                    h = AttnBlock(cfg.num_heads, cfg.groups, dt, name=f"down{level}_attn{i}")(h)
            if level < len(cfg.channel_mults) - 1:
                h = nn.Conv(ch * mult, (3, 3), strides=(2, 2), dtype=dt,
                            name=f"down{level}_pool")(h)
                res //= 2
        h = ResBlock(ch * cfg.channel_mults[-1], cfg.groups, cfg.dropout, dt,
                     name="mid_res")(h, emb, deterministic)
        h = nn.silu(nn.GroupNorm(cfg.groups, dtype=dt, name="norm_out")(h))
        return nn.Dense(cfg.num_classes, name="head")(h.mean(axis=(1, 2))).astype(jnp.float32)
