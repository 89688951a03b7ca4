"""CLIP (Radford et al. 2021): an image tower and a text tower mapped into one space, trained with
the symmetric InfoNCE loss, or with SigLIP's sigmoid loss (Zhai et al. 2023).

- Image tower: any module with a ``features(images, deterministic)`` method returning the pooled
  representation [N, W] (the ViT of ``research.models.vit``), passed in as ``image_encoder``.
- Text tower (``TextEncoder``): token + learned position embeddings, ``Block``s of the shared
  transformer, a final norm, pooled at the ``[EOS]`` token (the first position holding
  ``eos_id``), as OpenAI's CLIP. ``causal=True`` (the default, OpenAI's and Hugging Face's text
  transformer) uses a causal mask, so the ``[EOS]`` token reads every word before it;
  ``causal=False`` is a bidirectional encoder with a padding mask, pooled at the same position.
- Projections (``image_proj``, ``text_proj``: linear, no bias) into ``embed_dim``, then L2
  normalisation.
- A learnable temperature, log-parameterised: ``scale = exp(min(log_scale, log 100))`` (the
  paper clips the logit scale at 100; clamping in the forward pass also stops its gradient there).
  InfoNCE starts at 1/0.07 (the paper), SigLIP at t' = log 10 with a bias b = -10 (its paper).

``ClipModel.apply({'params': p}, images, tokens)`` -> ``(image_emb, text_emb, scale, bias)``;
``method='encode_image'`` / ``'encode_text'`` give one side. The losses are plain functions of
the embeddings (``infonce_loss``, ``siglip_loss``), computed over the *global* batch: under ``jit``
with the batch sharded over devices, ``img @ txt.T`` is the global similarity matrix (XLA gathers
the features), so every example sees all negatives. ``infonce_loss_shard_map`` writes the same
with an explicit ``all_gather`` inside ``jax.shard_map`` (each device computes its rows).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research.models.transformer import Block, TransformerConfig, make_norm
from research.nn.layers import logical, normal_init

LOSSES = ("infonce", "siglip")
MAX_SCALE = 100.0


def logit_scale(log_scale: jax.Array, max_scale: float = MAX_SCALE) -> jax.Array:
    """exp(log_scale) clamped at ``max_scale`` (CLIP: 100)."""
    return jnp.exp(jnp.minimum(log_scale, math.log(max_scale)))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def infonce_loss(img: jax.Array, txt: jax.Array, scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE (CLIP's pseudocode): logits = scale * img @ txt.T over the whole batch;
    mean of the image->text and text->image cross-entropies with the diagonal as targets."""
    logits = scale * img @ txt.T
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (i2t + t2i)


def siglip_loss(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """SigLIP (Zhai et al. 2023, Algorithm 1): logits = t * img @ txt.T + b, labels z = +1 on the
    diagonal and -1 elsewhere; loss = -sum(log_sigmoid(z * logits)) / N."""
    logits = scale * img @ txt.T + bias
    n = logits.shape[0]
    z = 2.0 * jnp.eye(n) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n


def contrastive_loss(kind: str, img, txt, scale, bias=None) -> jax.Array:
    if kind == "infonce":
        return infonce_loss(img, txt, scale)
    if kind == "siglip":
        return siglip_loss(img, txt, scale, bias)
    raise ValueError(f"Unknown contrastive loss {kind!r}; expected one of {LOSSES}")


def infonce_loss_shard_map(img: jax.Array, txt: jax.Array, scale: jax.Array, mesh,
                           axis: str | tuple[str, ...] = "data") -> jax.Array:
    """``infonce_loss`` with the batch split over mesh ``axis``, written with explicit collectives:
    each device all-gathers the image and text features, computes the cross-entropies of its own
    rows (its images against all texts, its texts against all images) and the losses are summed
    over devices. Equal to ``infonce_loss`` on the global batch, gradients included (the
    all-gather's transpose sums the gradient shards back)."""
    from jax.sharding import PartitionSpec as P

    def local(img_l, txt_l, scale):
        n_local = img_l.shape[0]
        img_all = jax.lax.all_gather(img_l, axis, tiled=True)
        txt_all = jax.lax.all_gather(txt_l, axis, tiled=True)
        n = img_all.shape[0]
        labels = jax.lax.axis_index(axis) * n_local + jnp.arange(n_local)
        i2t = optax.softmax_cross_entropy_with_integer_labels(scale * img_l @ txt_all.T, labels)
        t2i = optax.softmax_cross_entropy_with_integer_labels(scale * txt_l @ img_all.T, labels)
        return jax.lax.psum(0.5 * (i2t.sum() + t2i.sum()) / n, axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P()), out_specs=P())(
        img, txt, scale)


class TextEncoder(nn.Module):
    """Caption tokens [N, L] -> pooled features [N, E] (the final-normed hidden state at the
    first ``eos_id`` token). ``pad_id`` positions are masked out as keys."""

    cfg: TransformerConfig
    causal: bool = True
    eos_id: int = 1
    pad_id: int = 0

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(f"Captions of {tokens.shape[1]} tokens exceed the text tower's "
                             f"max_len={cfg.max_len}; raise config.model.text.max_len.")
        x = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype,
                     embedding_init=logical(normal_init(0.02), ("vocab", "embed")),
                     name="token_embed")(tokens)
        pos = self.param("pos_embed", logical(normal_init(0.01), (None, "embed")),
                         (cfg.max_len, cfg.embed_dim))
        x = x + pos[: tokens.shape[1]].astype(x.dtype)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        mask = (tokens != self.pad_id)[:, None, None, :]
        for i in range(cfg.num_layers):
            x, _ = Block(cfg, causal=self.causal, name=f"layer_{i}")(
                x, deterministic=deterministic, mask=mask)
        if cfg.norm_position == "pre":
            x = make_norm(cfg, name="final_norm")(x)
        eos = jnp.argmax(tokens == self.eos_id, axis=-1)
        return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


class ClipModel(nn.Module):
    """Two towers, linear projections into ``embed_dim``, L2 normalisation, a learnable
    temperature (and SigLIP's learnable bias when ``loss='siglip'``)."""

    image_encoder: nn.Module
    text_cfg: TransformerConfig
    embed_dim: int = 64
    loss: str = "infonce"
    text_causal: bool = True
    eos_id: int = 1
    pad_id: int = 0

    def setup(self):
        if self.loss not in LOSSES:
            raise ValueError(f"ClipModel loss={self.loss!r}: expected one of {LOSSES}")
        self.text_encoder = TextEncoder(self.text_cfg, causal=self.text_causal,
                                        eos_id=self.eos_id, pad_id=self.pad_id)
        proj = lambda name: nn.Dense(  # noqa: E731
            self.embed_dim, use_bias=False, name=name,
            kernel_init=logical(nn.initializers.lecun_normal(), ("embed", None)))
        self.image_proj, self.text_proj = proj("image_proj"), proj("text_proj")
        init_scale = math.log(10.0) if self.loss == "siglip" else math.log(1 / 0.07)
        self.log_scale = self.param("log_scale", nn.initializers.constant(init_scale), (),
                                    jnp.float32)
        if self.loss == "siglip":
            self.bias = self.param("bias", nn.initializers.constant(-10.0), (), jnp.float32)

    def image_features(self, images, deterministic: bool = True):
        """The image tower's pooled features [N, W] (before the projection): what a linear probe
        reads."""
        return self.image_encoder.features(images, deterministic=deterministic)

    def encode_image(self, images, deterministic: bool = True):
        return l2_normalize(self.image_proj(self.image_features(images, deterministic)))

    def encode_text(self, tokens, deterministic: bool = True):
        return l2_normalize(self.text_proj(self.text_encoder(tokens, deterministic)))

    def temperature(self):
        """(scale, bias): the clamped logit scale and SigLIP's bias (None for InfoNCE)."""
        return logit_scale(self.log_scale), (self.bias if self.loss == "siglip" else None)

    def __call__(self, images, tokens, deterministic: bool = True):
        scale, bias = self.temperature()
        return (self.encode_image(images, deterministic), self.encode_text(tokens, deterministic),
                scale, bias)


def similarity(img: jax.Array, txt: jax.Array, scale: Any = 1.0) -> jax.Array:
    return scale * img @ txt.T
