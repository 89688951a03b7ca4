"""The diffusion prior of DALL-E 2 (unCLIP, Ramesh et al. 2022, section 2.2): a transformer that
denoises a CLIP image embedding conditioned on the CLIP text embedding of its caption.

The input sequence is ``[text embedding, timestep embedding, noised image embedding z_t, query]``
(each projected to ``width``), with learned positions, through ``num_layers`` causal ``Block``s of
the shared transformer; the output at the query token is projected back to ``embed_dim``. As in
the paper the prior predicts the un-noised embedding ``x0`` directly (not epsilon) and is trained
with the mean squared error to it; ``x0_to_eps`` turns its output into the epsilon the DDPM/DDIM
samplers of ``research.diffusion.samplers`` take. Used only through pure ``init``/``apply``.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.diffusion.schedules import Schedule
from research.models.transformer import Block, TransformerConfig
from research.models.unet import timestep_embedding


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    embed_dim: int = 64        # the CLIP embedding width (text and image)
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0

    def transformer(self) -> TransformerConfig:
        return TransformerConfig(vocab_size=1, num_layers=self.num_layers, num_heads=self.num_heads,
                                 embed_dim=self.width, max_len=4, mlp_ratio=self.mlp_ratio,
                                 dropout=self.dropout)


class DiffusionPrior(nn.Module):
    config: PriorConfig

    @nn.compact
    def __call__(self, z_t: jax.Array, t: jax.Array, text_emb: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """z_t [B, E] noised image embeddings, t [B] steps, text_emb [B, E] -> x0 [B, E]."""
        cfg = self.config
        w = cfg.width
        tokens = jnp.stack([
            nn.Dense(w, name="text_in")(text_emb),
            nn.Dense(w, name="time_in")(nn.silu(nn.Dense(w, name="time_mlp")(
                timestep_embedding(t, w)))),
            nn.Dense(w, name="z_in")(z_t),
            jnp.broadcast_to(self.param("query", nn.initializers.normal(0.02), (w,)), (z_t.shape[0], w)),
        ], axis=1)
        tokens = tokens + self.param("pos", nn.initializers.normal(0.02), (4, w))
        tcfg = cfg.transformer()
        for i in range(cfg.num_layers):
            tokens, _ = Block(tcfg, causal=True, name=f"layer_{i}")(tokens, deterministic=deterministic)
        return nn.Dense(cfg.embed_dim, name="out")(nn.LayerNorm(name="norm")(tokens[:, -1]))


def x0_to_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """epsilon = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t), per example."""
    ab = jnp.asarray(schedule.alphas_cumprod)[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
    return (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
