"""A BERT-style encoder with a masked-LM head, as a configuration of ``transformer.Block``.

``Encoder(cfg, enc)`` is Hugging Face ``BertForMaskedLM`` built from our blocks:

* embeddings: token + learned position + token-type (segment) embeddings, summed, then a
  LayerNorm (``embed_norm``) and dropout;
* ``cfg.num_layers`` x ``Block(cfg, causal=False)``: bidirectional self-attention under a padding
  mask (``mask=padding[:, None, None, :]``: no query attends to a pad key). BERT is post-norm
  (``cfg.norm_position='post'``: ``Norm(x + Sublayer(x))``, no final norm); with ``'pre'`` a final
  norm is added, as in the decoder;
* the masked-LM head: ``mlm_dense`` (E -> E) -> ``cfg.activation`` -> ``mlm_norm`` (LayerNorm) ->
  the output projection tied to the token embedding (``cfg.tie_embeddings``; else ``mlm_decoder``)
  plus an output bias ``mlm_bias`` [vocab].

BERT-base is ``TransformerConfig(vocab_size=30522, num_layers=12, num_heads=12, embed_dim=768,
max_len=512, activation='gelu', dropout=0.1, norm_eps=1e-12, norm_position='post')`` with
``EncoderConfig(type_vocab_size=2, pad_id=0)``. BERT-only settings live in ``EncoderConfig``, not in
``TransformerConfig``; ``configs_from_dict`` splits one ``config.model`` dict between the two.

Use only through pure init/apply:

* ``apply({'params': p}, tokens, token_types=None, padding=None)`` -> MLM logits [B, T, vocab]
  (float32);
* ``apply(..., method='hidden')`` -> the encoder output [B, T, E] (for classification heads).

``padding`` [B, T] is True at real tokens; when None it is ``tokens != enc.pad_id`` (or all True
when ``pad_id`` is None). ``token_types`` None means all zeros (one segment). A sequence longer
than ``cfg.max_len`` raises ``ValueError`` (learned positions); it is never truncated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.core.config import ConfigError
from research.models.transformer import (
    REMAT_POLICIES, Block, TransformerConfig, make_norm)
from research.nn.layers import ACTIVATIONS, logical, normal_init


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Settings of the BERT encoder that a decoder does not have."""

    type_vocab_size: int = 2        # token-type (segment) ids in [0, type_vocab_size)
    pad_id: int | None = None       # the [PAD] token id: padding = tokens != pad_id by default

    def __post_init__(self):
        if not (isinstance(self.type_vocab_size, int) and self.type_vocab_size > 0):
            raise ConfigError(f"config.model.type_vocab_size={self.type_vocab_size!r} is invalid:"
                              " expected a positive int (BERT: 2).")
        if self.pad_id is not None and not (isinstance(self.pad_id, int) and self.pad_id >= 0):
            raise ConfigError(f"pad_id={self.pad_id!r} is invalid: expected None or an id >= 0.")


def configs_from_dict(d: Mapping[str, Any], **overrides) -> tuple[TransformerConfig, EncoderConfig]:
    """One ``config.model`` dict (``TransformerConfig`` and ``EncoderConfig`` fields) -> both
    configs; ``overrides`` (e.g. ``vocab_size``, ``pad_id``) replace entries. Unknown keys raise
    ``ConfigError`` listing the known ones."""
    d = {**dict(d), **overrides}
    t_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    e_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = set(d) - t_fields - e_fields
    if unknown:
        raise ConfigError(f"Unknown config.model keys {sorted(unknown)}; known: "
                          f"{sorted(t_fields | e_fields)}")
    cfg = TransformerConfig(**{k: v for k, v in d.items() if k in t_fields})
    enc = EncoderConfig(**{k: v for k, v in d.items() if k in e_fields})
    check_dense(cfg, "the BERT encoder")
    if enc.pad_id is not None and enc.pad_id >= cfg.vocab_size:
        raise ConfigError(f"pad_id={enc.pad_id} is outside the vocabulary of {cfg.vocab_size}.")
    return cfg, enc


def check_dense(cfg: TransformerConfig, model: str) -> None:
    """Options of ``TransformerConfig`` that only the decoder implements (mixture-of-experts MLPs)
    are refused rather than silently ignored."""
    if getattr(cfg, "moe_experts", 0):
        raise ConfigError(f"config.model.moe_experts={cfg.moe_experts}: {model} has dense MLPs "
                          "only; set moe_experts=0.")


def model_meta(cfg: TransformerConfig, enc: EncoderConfig) -> dict:
    """Both configs as one flat dict (what a checkpoint's ``model`` entry records)."""
    return {**dataclasses.asdict(cfg), **dataclasses.asdict(enc)}


class Encoder(nn.Module):
    """BERT-style bidirectional encoder with a masked-LM head (see the module docstring)."""

    cfg: TransformerConfig
    enc: EncoderConfig = EncoderConfig()

    def setup(self):
        cfg, enc = self.cfg, self.enc
        check_dense(cfg, "the BERT encoder")
        init = logical(normal_init(0.02), ("vocab", "embed"))
        self.token_embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype,
                                    embedding_init=init)
        if cfg.positions == "learned":
            self.pos_embed = self.param("pos_embed", logical(normal_init(0.02), (None, "embed")),
                                        (cfg.max_len, cfg.embed_dim))
        self.type_embed = self.param("type_embed", logical(normal_init(0.02), (None, "embed")),
                                     (enc.type_vocab_size, cfg.embed_dim))
        self.embed_norm = make_norm(cfg)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        block = Block
        if cfg.remat != "none":
            # Block.__call__(x, cache, index, deterministic, mask): deterministic is static.
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(4,))
        self.blocks = [block(cfg, causal=False, name=f"layer_{i}") for i in range(cfg.num_layers)]
        if cfg.norm_position == "pre":
            self.final_norm = make_norm(cfg)
        self.mlm_dense = nn.Dense(
            cfg.embed_dim, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
            kernel_init=logical(normal_init(0.02), ("embed", "mlp")),
            bias_init=logical(nn.initializers.zeros, ("mlp",)))
        self.mlm_norm = make_norm(cfg)
        if not cfg.tie_embeddings:
            self.mlm_decoder = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                kernel_init=logical(normal_init(0.02), ("embed", "vocab")))
        self.mlm_bias = self.param("mlm_bias", logical(nn.initializers.zeros, ("vocab",)),
                                   (cfg.vocab_size,))

    def __call__(self, tokens: jax.Array, token_types: jax.Array | None = None,
                 padding: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """tokens [B, T] -> masked-LM logits [B, T, vocab] (float32)."""
        return self.mlm_head(self.hidden(tokens, token_types, padding, deterministic))

    def hidden(self, tokens: jax.Array, token_types: jax.Array | None = None,
               padding: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """tokens [B, T] -> the encoder output [B, T, E] (the last block's, or the final norm's
        with ``norm_position='pre'``)."""
        cfg = self.cfg
        t = tokens.shape[1]
        if cfg.positions == "learned" and t > cfg.max_len:
            raise ValueError(
                f"Sequence length {t} exceeds the encoder's positions config.model.max_len="
                f"{cfg.max_len}; split or crop the input, or raise max_len.")
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        if padding is None and self.enc.pad_id is not None:
            padding = tokens != self.enc.pad_id
        x = self.token_embed(tokens)
        x = x + jnp.take(self.type_embed, token_types, axis=0).astype(cfg.compute_dtype)
        if cfg.positions == "learned":
            x = x + self.pos_embed[:t].astype(cfg.compute_dtype)
        x = self.embed_dropout(self.embed_norm(x), deterministic=deterministic)
        mask = None if padding is None else padding.astype(bool)[:, None, None, :]
        for block in self.blocks:
            x, _ = block(x, None, None, deterministic, mask)
        if cfg.norm_position == "pre":
            x = self.final_norm(x)
        return x

    def mlm_head(self, x: jax.Array) -> jax.Array:
        """Encoder output [..., E] -> masked-LM logits [..., vocab] (float32)."""
        h = self.mlm_norm(ACTIVATIONS[self.cfg.activation](self.mlm_dense(x)))
        if self.cfg.tie_embeddings:
            logits = self.token_embed.attend(h)
        else:
            logits = self.mlm_decoder(h)
        return logits.astype(jnp.float32) + self.mlm_bias
