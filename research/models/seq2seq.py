"""The original encoder-decoder Transformer (Vaswani et al. 2017) as a configuration of ``Block``.

``EncoderDecoder(cfg)`` is the paper's model built from ``research.models.transformer.Block``:

* encoder: ``cfg.num_layers`` x ``Block(cfg, causal=False)`` with a source padding mask;
* decoder: ``cfg.num_layers`` x ``Block(cfg, causal=True, cross=True)``, cross-attending to the
  encoder output under the same padding mask;
* one token embedding shared by source, target and the output projection (the paper's section
  3.4 ties all three), multiplied by ``sqrt(embed_dim)``;
* sinusoidal positions, ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) =
  cos(pos / 10000^(2i/d))`` (section 3.5), added after the scaled embedding, then dropout;
* ``cfg.norm_position``: ``'post'`` is the paper (``Norm(x + Sublayer(x))``, no final norm);
  ``'pre'`` adds a final norm after each stack (as ``torch.nn.Transformer(norm_first=True)``).

The paper's base model is ``TransformerConfig(num_layers=6, num_heads=8, embed_dim=512,
mlp_ratio=4, activation='relu', dropout=0.1, norm_position='post')``.

Use only through pure init/apply:

* ``apply({'params': p}, src, tgt_in)`` -> logits ``[B, T, vocab]`` (teacher forcing);
* ``apply(..., src, method='encode')`` -> ``(enc_out [B, S, E], src_mask [B, S])``;
* ``apply(..., tgt_tokens, enc_out, src_mask, caches, index, method='decode')`` ->
  ``(logits, caches)``: new target tokens at positions ``[index, index + T)`` through the decoder
  with its self-attention KV cache (``research.models.transformer.init_caches(cfg, B, len)``);
  cross-attention keys are recomputed from ``enc_out`` at every step.

Token id ``pad_id`` (default 0) in the source is padding: no query attends to it.
``cfg.positions`` must stay ``'learned'`` (the default), which for ``Block`` means "positions are
added by the caller": this model adds the sinusoidal ones.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError
from research.models.encoder import check_dense
from research.models.transformer import (
    REMAT_POLICIES, Block, TransformerConfig, make_norm)
from research.nn.layers import logical, normal_init


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """[length, dim] float32 table of the paper's section 3.5 (sin on even, cos on odd dims)."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    i = np.arange(0, dim, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, i / dim)
    table = np.zeros((length, dim), np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : dim // 2])
    return table.astype(np.float32)


def check_config(cfg: TransformerConfig) -> None:
    check_dense(cfg, "the encoder-decoder")
    if cfg.positions != "learned":
        raise ConfigError(
            f"config.model.positions={cfg.positions!r}: the encoder-decoder adds the paper's "
            "sinusoidal positions itself; leave config.model.positions at its default 'learned' "
            "(which makes the blocks add none).")
    if not cfg.tie_embeddings:
        raise ConfigError("config.model.tie_embeddings=False: the encoder-decoder shares one "
                          "embedding for source, target and output; set it to True.")
    if cfg.embed_dim % 2:
        raise ConfigError(f"config.model.embed_dim={cfg.embed_dim} must be even for sinusoidal "
                          "positions.")


class EncoderDecoder(nn.Module):
    cfg: TransformerConfig
    pad_id: int = 0

    def setup(self):
        cfg = self.cfg
        check_config(cfg)
        self.token_embed = nn.Embed(
            cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype,
            embedding_init=logical(normal_init(0.02), ("vocab", "embed")))
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(4,))
        self.encoder = [block(cfg, causal=False, name=f"encoder_{i}")
                        for i in range(cfg.num_layers)]
        self.decoder = [block(cfg, causal=True, cross=True, name=f"decoder_{i}")
                        for i in range(cfg.num_layers)]
        if cfg.norm_position == "pre":
            self.encoder_norm = make_norm(cfg)
            self.decoder_norm = make_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    # -- pieces ---------------------------------------------------------------------------------
    def _check_length(self, t: int, what: str):
        if t > self.cfg.max_len:
            raise ValueError(
                f"{what} length {t} exceeds the model's config.model.max_len={self.cfg.max_len}; "
                "shorten the sequences or raise max_len.")

    def _embed(self, tokens, positions, deterministic):
        cfg = self.cfg
        table = jnp.asarray(sinusoidal_positions(cfg.max_len, cfg.embed_dim))
        x = self.token_embed(tokens) * math.sqrt(cfg.embed_dim)
        x = x + table[positions].astype(cfg.compute_dtype)
        return self.dropout(x, deterministic=deterministic)

    def encode(self, src: jax.Array, deterministic: bool = True):
        """src [B, S] -> (encoder output [B, S, E], src_mask [B, S] bool, True = a real token)."""
        self._check_length(src.shape[1], "Source")
        src_mask = src != self.pad_id
        x = self._embed(src, jnp.arange(src.shape[1]), deterministic)
        attn_mask = src_mask[:, None, None, :]
        for block in self.encoder:
            x, _ = block(x, None, None, deterministic, attn_mask)
        if self.cfg.norm_position == "pre":
            x = self.encoder_norm(x)
        return x, src_mask

    def _decoder(self, tgt, positions, enc_out, src_mask, caches, index, deterministic):
        x = self._embed(tgt, positions, deterministic)
        context_mask = src_mask[:, None, None, :]
        new_caches = {}
        for i, block in enumerate(self.decoder):
            cache = None if caches is None else caches[f"layer_{i}"]
            x, new_caches[f"layer_{i}"] = block(x, cache, index, deterministic, None, enc_out,
                                                context_mask)
        if self.cfg.norm_position == "pre":
            x = self.decoder_norm(x)
        logits = self.token_embed.attend(x).astype(jnp.float32)
        return logits, (None if caches is None else new_caches)

    # -- entry points ---------------------------------------------------------------------------
    def __call__(self, src: jax.Array, tgt_in: jax.Array, deterministic: bool = True):
        """Teacher forcing: src [B, S], tgt_in [B, T] (BOS + target[:-1]) -> logits [B, T, V]."""
        self._check_length(tgt_in.shape[1], "Target")
        enc_out, src_mask = self.encode(src, deterministic)
        logits, _ = self._decoder(tgt_in, jnp.arange(tgt_in.shape[1]), enc_out, src_mask, None,
                                  None, deterministic)
        return logits

    def decode(self, tgt_tokens: jax.Array, enc_out: jax.Array, src_mask: jax.Array, caches,
               index):
        """New target tokens [B, T] at positions [index, index + T), reading/writing the decoder
        self-attention caches (one per layer, ``init_caches(cfg, B, length)``); returns
        ``(logits [B, T, V], caches)``. ``index`` may be traced; keep index + T <= the cache
        length and cfg.max_len."""
        self._check_length(tgt_tokens.shape[1], "Target")
        cache_len = jax.tree.leaves(caches)[0].shape[1]
        if cache_len > self.cfg.max_len:
            raise ValueError(f"A KV cache of length {cache_len} exceeds config.model.max_len="
                             f"{self.cfg.max_len}; decode at most max_len target tokens.")
        if tgt_tokens.shape[1] > cache_len:
            raise ValueError(f"{tgt_tokens.shape[1]} new tokens do not fit the KV cache of length "
                             f"{cache_len}; pass a longer max_len to init_caches.")
        positions = index + jnp.arange(tgt_tokens.shape[1])
        return self._decoder(tgt_tokens, positions, enc_out, src_mask, caches, index, True)


Seq2Seq = EncoderDecoder


def flops_per_example(cfg: TransformerConfig, src_len: int, tgt_len: int) -> float:
    """Training FLOPs of one (source, target) pair, forward + backward (the 6N-per-token rule of
    PaLM appendix B applied to each stack, plus attention): encoder parameters see the source
    tokens, decoder parameters the target tokens; the tied embedding matrix counts once, as the
    output projection over the target."""
    e, h = cfg.embed_dim, cfg.mlp_hidden_dim
    attn = 4 * e * e
    mlp = 2 * e * h
    enc = cfg.num_layers * (attn + mlp)
    dec = cfg.num_layers * (2 * attn + mlp)
    embed = cfg.vocab_size * e
    dense = 6.0 * (enc * src_len + (dec + embed) * tgt_len)
    attention = 12.0 * cfg.num_layers * e * (src_len * src_len + tgt_len * tgt_len
                                             + tgt_len * src_len)
    return dense + attention
