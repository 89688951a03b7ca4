"""A VQ autoencoder (VQ-VAE, van den Oord et al. 2017) with an EMA codebook and dead-code restarts.

- Encoder: 3x3 conv, then per extra entry of ``channels`` a stride-2 conv (each halves H and W),
  ``num_res_blocks`` residual blocks (GroupNorm -> SiLU -> conv, twice) per level, and a final
  GroupNorm -> SiLU -> 1x1 conv to ``latent_dim`` channels: ``z_e`` [B, H/f, W/f, D] with
  ``f = 2 ** (len(channels) - 1)``.
- Quantizer: each latent vector is replaced by its nearest codebook entry (squared Euclidean
  distance) ``z_q``; the decoder reads ``z_e + stop_gradient(z_q - z_e)`` (the straight-through
  estimator: the forward value is ``z_q``, the gradient flows to ``z_e`` unchanged). The commitment
  loss ``beta * |z_e - sg(z_q)|^2`` pulls the encoder toward its codes.
- Codebook (VQ-VAE paper, appendix A.1; Sonnet's ``VectorQuantizerEMA``): no gradient, but EMA
  updates ``N_k <- d N_k + (1-d) n_k``, ``m_k <- d m_k + (1-d) sum_{i: k(i)=k} z_i``, then
  ``e_k = m_k / N~_k`` with the Laplace-smoothed count ``N~_k = (N_k + eps) / (n + K eps) n``,
  ``n = sum_k N_k``. Dead-code restarts (Jukebox, Dhariwal et al. 2020): a code whose EMA count
  falls below ``dead_threshold`` is reset to a random encoder output of the batch (``N_k = 1``,
  ``m_k = e_k = z``), so every code keeps being tried.
- Decoder: the mirror image (1x1 conv in, residual blocks, nearest upsampling + 3x3 conv), a linear
  3x3 conv out (images in [-1, 1]).

The codebook lives in the parameters as ``params['quantizer'] = {'embedding', 'ema_count',
'ema_sum'}``; ``ema_update`` and ``restart_dead_codes`` are pure functions of them (the task's
train loop applies them after the optimizer step, with the codebook frozen for the optimizer).
Used only through pure ``init``/``apply``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VQConfig:
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)     # one level per entry; each after the first halves H, W
    num_res_blocks: int = 1
    groups: int = 8
    latent_dim: int = 4                      # D, the width of a code
    codebook_size: int = 256                 # K
    beta: float = 0.25                       # commitment loss weight
    decay: float = 0.99                      # EMA decay of the codebook statistics
    eps: float = 1e-5                        # Laplace smoothing of the EMA counts
    dead_threshold: float = 1.0              # EMA count below which a code is restarted

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        if not self.channels:
            raise ValueError("vqvae: channels must have at least one entry")
        for c in self.channels:
            if c % self.groups:
                raise ValueError(f"vqvae: width {c} must divide by groups={self.groups} (GroupNorm)")
        if self.codebook_size < 2 or self.latent_dim < 1:
            raise ValueError(f"vqvae: codebook_size={self.codebook_size} (>= 2) and latent_dim="
                             f"{self.latent_dim} (>= 1)")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"vqvae: decay={self.decay}: expected 0 < decay < 1")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ValueError(f"vqvae: image_size={image_size} does not divide by the downsampling "
                             f"factor {self.downsample}")
        s = image_size // self.downsample
        return (s, s, self.latent_dim)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> "VQConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown VQ config keys {unknown}; known: {sorted(names)}")
        return cls(**{**dict(d), **overrides})


class Res(nn.Module):
    ch: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.ch, (3, 3))(nn.silu(nn.GroupNorm(self.groups)(x)))
        h = nn.Conv(self.ch, (3, 3))(nn.silu(nn.GroupNorm(self.groups)(h)))
        if x.shape[-1] != self.ch:
            x = nn.Conv(self.ch, (1, 1))(x)
        return x + h


class Encoder(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = nn.Conv(cfg.channels[0], (3, 3), name="conv_in")(x)
        for level, ch in enumerate(cfg.channels):
            if level > 0:
                h = nn.Conv(ch, (4, 4), strides=(2, 2), name=f"down{level}")(h)
            for i in range(cfg.num_res_blocks):
                h = Res(ch, cfg.groups, name=f"res{level}_{i}")(h)
        h = nn.silu(nn.GroupNorm(cfg.groups, name="norm_out")(h))
        return nn.Conv(cfg.latent_dim, (1, 1), name="conv_out")(h)


class Decoder(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.cfg
        h = nn.Conv(cfg.channels[-1], (3, 3), name="conv_in")(z)
        for level in reversed(range(len(cfg.channels))):
            ch = cfg.channels[level]
            for i in range(cfg.num_res_blocks):
                h = Res(ch, cfg.groups, name=f"res{level}_{i}")(h)
            if level > 0:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, hh * 2, ww * 2, c), "nearest")
                h = nn.Conv(cfg.channels[level - 1], (3, 3), name=f"up{level}")(h)
        h = nn.silu(nn.GroupNorm(cfg.groups, name="norm_out")(h))
        return nn.Conv(cfg.in_channels, (3, 3), name="conv_out")(h)


def nearest_codes(z: jax.Array, embedding: jax.Array) -> jax.Array:
    """Indices [...] of the nearest codebook rows (squared Euclidean distance) for z [..., D]."""
    flat = z.reshape(-1, z.shape[-1])
    d = (jnp.sum(flat ** 2, -1, keepdims=True) - 2 * flat @ embedding.T
         + jnp.sum(embedding ** 2, -1)[None])
    return jnp.argmin(d, axis=-1).reshape(z.shape[:-1])


def straight_through(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """Forward value z_q, gradient of the identity to z_e."""
    return z_e + jax.lax.stop_gradient(z_q - z_e)


def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of the code distribution ``counts / sum(counts)``: K when every code is
    equally used, 1 when one code takes everything."""
    p = counts / jnp.maximum(counts.sum(), 1e-10)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def code_stats(z_e: jax.Array, idx: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(counts n_k [K], sums [K, D]) of the batch's assignments."""
    flat = z_e.reshape(-1, z_e.shape[-1]).astype(jnp.float32)
    onehot = jax.nn.one_hot(idx.reshape(-1), k, dtype=jnp.float32)
    return onehot.sum(0), onehot.T @ flat


def ema_update(q: Mapping[str, jax.Array], counts: jax.Array, sums: jax.Array, decay: float,
               eps: float) -> dict:
    """The EMA codebook update (VQ-VAE appendix A.1, Sonnet's Laplace smoothing)."""
    ema_count = decay * q["ema_count"] + (1.0 - decay) * counts
    ema_sum = decay * q["ema_sum"] + (1.0 - decay) * sums
    n = ema_count.sum()
    k = ema_count.shape[0]
    smoothed = (ema_count + eps) / (n + k * eps) * n
    return {"embedding": ema_sum / smoothed[:, None], "ema_count": ema_count, "ema_sum": ema_sum}


def restart_dead_codes(q: Mapping[str, jax.Array], z_e: jax.Array, rng: jax.Array,
                       threshold: float) -> tuple[dict, jax.Array]:
    """Reset every code with ``ema_count < threshold`` to a random encoder output of the batch
    (count 1, sum = embedding = that vector). Returns ``(new codebook, number restarted)``."""
    flat = z_e.reshape(-1, z_e.shape[-1]).astype(jnp.float32)
    k = q["ema_count"].shape[0]
    pick = flat[jax.random.randint(rng, (k,), 0, flat.shape[0])]
    dead = q["ema_count"] < threshold
    out = {"embedding": jnp.where(dead[:, None], pick, q["embedding"]),
           "ema_sum": jnp.where(dead[:, None], pick, q["ema_sum"]),
           "ema_count": jnp.where(dead, 1.0, q["ema_count"])}
    return out, dead.sum()


class Codebook(nn.Module):
    """Holds ``embedding`` [K, D] and its EMA statistics (no gradient reaches them)."""
    size: int
    dim: int

    @nn.compact
    def __call__(self, z_e):
        emb = self.param("embedding", nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                         (self.size, self.dim))
        self.param("ema_count", nn.initializers.ones, (self.size,))
        self.param("ema_sum", lambda rng, shape: emb, (self.size, self.dim))
        emb = jax.lax.stop_gradient(emb)
        idx = nearest_codes(z_e, emb)
        return emb[idx], idx


class VQVAE(nn.Module):
    config: VQConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = Codebook(cfg.codebook_size, cfg.latent_dim)

    def encode(self, x):
        """Images -> pre-quantization latents z_e [B, h, w, D]."""
        return self.encoder(x)

    def quantize(self, z_e):
        """-> (z_q, indices)."""
        return self.quantizer(z_e)

    def decode(self, z, quantize: bool = True):
        """Latents -> images; with ``quantize`` the latents are first snapped to the codebook
        (latent diffusion samples decode this way: the quantizer is part of the decoder)."""
        if quantize:
            z, _ = self.quantizer(z)
        return self.decoder(z)

    def __call__(self, x):
        z_e = self.encoder(x)
        z_q, idx = self.quantizer(z_e)
        recon = self.decoder(straight_through(z_e, z_q))
        commit = jnp.mean(jnp.square(z_e - jax.lax.stop_gradient(z_q)))
        return {"recon": recon, "z_e": z_e, "z_q": z_q, "indices": idx, "commitment": commit}
