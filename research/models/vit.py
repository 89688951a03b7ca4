"""Vision Transformer (Dosovitskiy et al. 2021) built from the shared transformer ``Block``.

``ViT(cfg, vit)``: images [N, H, W, C] (or [N, H, W] when ``channels == 1``), already normalised
floats ->

* patch embedding: the image cut into non-overlapping ``patch_size`` x ``patch_size`` patches, each
  flattened in (row, column, channel) order and projected to ``cfg.embed_dim``. The parameter
  ``patch_embed/kernel`` has a convolution's layout [p, p, C, E] (Flax ``nn.Conv``'s; PyTorch's
  ``Conv2d`` weight [E, C, p, p] is its ``transpose(2, 3, 1, 0)``) and is applied as
  reshape + one matmul, which equals the stride-p convolution and is faster on the CPU;
* ``pool='cls'``: a learned class token (``cls_token``) prepended; ``'mean'``: no class token, the
  tokens are averaged after the final norm;
* learned position embeddings ``pos_embed`` [num_tokens, E], dropout;
* optionally a LayerNorm on the embeddings (``embed_norm``: CLIP's ``ln_pre``);
* ``cfg.num_layers`` x ``Block(cfg, causal=False)`` (bidirectional; pre-LN with
  ``cfg.norm_position='pre'``, then a final norm ``final_norm``);
* ``features``: the pooled representation [N, E] (class token or mean), for CLIP's image tower
  and linear probes; ``__call__``: ``head`` (zero-initialised, as in the paper) -> logits
  [N, num_classes] (float32).

Images whose size or channel count do not fit the configured patching raise a ``ValueError`` that
names the expected shape. Use only through pure init/apply::

    model = ViT(*vit_configs_from_dict(config.model.to_dict()))
    params = model.init(rng, jnp.zeros((1, 28, 28, 1)))["params"]
    logits = model.apply({"params": params}, images)
    feats = model.apply({"params": params}, images, method="features")
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.core.config import ConfigError
from research.models.transformer import REMAT_POLICIES, Block, TransformerConfig, make_norm
from research.nn.layers import logical, normal_init

POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class VitConfig:
    """Settings of the ViT that a text transformer does not have (the rest is the
    ``TransformerConfig``: layers, heads, width, MLP, norm, dropout)."""

    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    num_classes: int | None = 10    # None: no classification head (an image tower)
    pool: str = "cls"               # 'cls' | 'mean'
    patch_bias: bool = True         # bias of the patch projection (CLIP's has none)
    embed_norm: bool = False        # a LayerNorm on the embeddings before the blocks (CLIP)

    def __post_init__(self):
        pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
        checks = {
            "image_size": (pos_int(self.image_size), "a positive int"),
            "patch_size": (pos_int(self.patch_size) and pos_int(self.image_size)
                           and self.image_size % self.patch_size == 0,
                           f"a positive divisor of image_size={self.image_size}"),
            "channels": (pos_int(self.channels), "a positive int"),
            "num_classes": (self.num_classes is None or pos_int(self.num_classes),
                            "None or a positive int"),
            "pool": (self.pool in POOLS, f"one of {list(POOLS)}"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"config.model.{key}={getattr(self, key)!r} is invalid: "
                                  f"expected {expected}.")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.pool == "cls" else 0)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)


def vit_configs_from_dict(d: Mapping[str, Any], **overrides) -> tuple[TransformerConfig, VitConfig]:
    """One ``config.model`` dict (``VitConfig`` and ``TransformerConfig`` fields; a ``name`` key is
    ignored) -> both configs. ``max_len`` is the token count and ``vocab_size`` unused, so both
    are set here. Unknown keys raise ``ConfigError`` listing the known ones."""
    d = {k: v for k, v in {**dict(d), **overrides}.items() if k != "name"}
    v_fields = {f.name for f in dataclasses.fields(VitConfig)}
    t_fields = {f.name for f in dataclasses.fields(TransformerConfig)} - {"vocab_size", "max_len"}
    unknown = set(d) - v_fields - t_fields
    if unknown:
        raise ConfigError(f"Unknown config.model keys {sorted(unknown)} for the ViT; known: "
                          f"{sorted(v_fields | t_fields)}")
    vit = VitConfig(**{k: v for k, v in d.items() if k in v_fields})
    cfg = TransformerConfig(vocab_size=1, max_len=vit.num_tokens,
                            **{k: v for k, v in d.items() if k in t_fields})
    return cfg, vit


def check_images(images: jax.Array, image_size: int, channels: int, what: str = "The model"):
    """[N, H, W, C] (or [N, H, W] when ``channels == 1``) of the configured size -> [N, H, W, C];
    anything else raises a ``ValueError`` naming the expected shape."""
    shape = tuple(images.shape)
    if len(shape) == 3 and channels == 1:
        images = images[..., None]
    expected = (f"[N, {image_size}, {image_size}, {channels}]"
                + (f" (or [N, {image_size}, {image_size}])" if channels == 1 else ""))
    if images.ndim != 4 or tuple(images.shape[1:]) != (image_size, image_size, channels):
        raise ValueError(f"{what} expects images of shape {expected} (config.model.image_size="
                         f"{image_size}, channels={channels}); got {shape}. Resize the images or "
                         "change config.model.image_size / channels.")
    return images


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[N, H, W, C] -> [N, (H/p)*(W/p), p*p*C]: row-major patches, each flattened in (row, column,
    channel) order (the order of a [p, p, C, E] convolution kernel flattened)."""
    n, h, w, c = images.shape
    p = patch_size
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> [N, num_patches, E]: a stride-p convolution written as
    ``patchify`` + one matmul with the kernel [p, p, C, E] reshaped to [p*p*C, E]."""

    patch_size: int
    embed_dim: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p, c = self.patch_size, images.shape[-1]
        fan_in = p * p * c
        kernel = self.param("kernel", logical(nn.initializers.lecun_normal(in_axis=(0, 1, 2),
                                                                            out_axis=3),
                                              (None, None, None, "embed")),
                            (p, p, c, self.embed_dim), jnp.float32)
        x = patchify(images.astype(self.dtype), p)
        n, t, _ = x.shape
        # A 2-D matmul over [N*T, p*p*C] (see ``Mlp``: faster than 3-D operands on XLA:CPU).
        y = x.reshape(n * t, fan_in) @ kernel.reshape(fan_in, self.embed_dim).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)),
                              (self.embed_dim,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y.reshape(n, t, self.embed_dim)


class ViT(nn.Module):
    cfg: TransformerConfig
    vit: VitConfig

    def setup(self):
        cfg, vit = self.cfg, self.vit
        if cfg.max_len != vit.num_tokens:
            raise ValueError(f"TransformerConfig.max_len={cfg.max_len} must equal the ViT's token "
                             f"count {vit.num_tokens}; build the configs with vit_configs_from_dict.")
        self.patch_embed = PatchEmbed(vit.patch_size, cfg.embed_dim, use_bias=vit.patch_bias,
                                      dtype=cfg.compute_dtype)
        if vit.pool == "cls":
            self.cls_token = self.param("cls_token", logical(normal_init(0.02), ("embed",)),
                                        (cfg.embed_dim,))
        self.pos_embed = self.param("pos_embed", logical(normal_init(0.02), (None, "embed")),
                                    (vit.num_tokens, cfg.embed_dim))
        self.embed_dropout = nn.Dropout(cfg.dropout)
        if vit.embed_norm:
            self.embed_norm = make_norm(cfg)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(4,))
        self.blocks = [block(cfg, causal=False, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.final_norm = make_norm(cfg)
        if vit.num_classes:
            self.head = nn.Dense(vit.num_classes, dtype=cfg.compute_dtype,
                                 kernel_init=logical(nn.initializers.zeros, ("embed", None)),
                                 bias_init=logical(nn.initializers.zeros, (None,)))

    def tokens(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """Images -> the final-normed token states [N, num_tokens, E] (class token first)."""
        cfg, vit = self.cfg, self.vit
        images = check_images(images, vit.image_size, vit.channels, "The ViT")
        x = self.patch_embed(images)
        if vit.pool == "cls":
            cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, cfg.embed_dim))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embed.astype(x.dtype)
        x = self.embed_dropout(x, deterministic=deterministic)
        if vit.embed_norm:
            x = self.embed_norm(x)
        for block in self.blocks:
            x, _ = block(x, None, None, deterministic)
        return self.final_norm(x)

    def features(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """Images -> the pooled representation [N, E] (class token, or the mean of the tokens)."""
        x = self.tokens(images, deterministic)
        return x[:, 0] if self.vit.pool == "cls" else x.mean(axis=1)

    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """Images -> class logits [N, num_classes] (float32)."""
        if not self.vit.num_classes:
            raise ValueError("This ViT has no classification head (num_classes=None); use "
                             "method='features'.")
        return self.head(self.features(images, deterministic)).astype(jnp.float32)


def flops_per_image(cfg: TransformerConfig, vit: VitConfig, n_params: int) -> float:
    """Training FLOPs per image (forward + backward): 6 N per token over the token-wise weights
    plus attention's 12 L H Q T per token (PaLM appendix B), with N excluding the position table."""
    t = vit.num_tokens
    n = n_params - vit.num_tokens * cfg.embed_dim
    return t * (6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t)
