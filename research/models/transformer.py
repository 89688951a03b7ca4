"""The transformer decoder (GPT) as Flax Linen modules, used only through pure init/apply.

``Decoder.apply({'params': p}, tokens)`` gives next-token logits for training;
``Decoder.apply({'params': p}, tokens, cache, index, method='decode')`` runs the same network over
new tokens at absolute positions ``[index, index + T)`` reading and writing a KV cache.

The GPT here follows nanoGPT (and GPT-2): learned positions, pre-LayerNorm blocks, GELU MLP,
causal multi-head attention, dropout on embeddings/attention/residuals, output projection tied to
the token embedding, N(0, 0.02) initialisation with residual projections scaled by 1/sqrt(2L).

LLaMA-style decoders are configurations of the same network (see ``TransformerConfig``):
``norm='rmsnorm'``, ``mlp='swiglu'``, ``positions='rope'`` (or ``'alibi'``), ``num_kv_heads`` for
grouped-query attention, ``tie_embeddings=False``, ``use_bias=False``. With the defaults the
parameters and numerics are exactly the GPT's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.core.config import ConfigError
from research.core.sharding import constrain
from research.nn.attention import Cache, MultiHeadAttention, init_cache
from research.nn.flash import IMPLS as ATTENTION_IMPLS
from research.nn.moe import ROUTINGS as MOE_ROUTINGS
from research.nn.moe import MoeMlp
from research.nn.layers import (
    ACTIVATIONS, Mlp, RMSNorm, SwiGluMlp, layer_norm, logical, normal_init)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope", "alibi")
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    num_layers: int = 6
    num_heads: int = 6
    embed_dim: int = 384
    max_len: int = 256
    mlp_ratio: int = 4
    dropout: float = 0.0
    use_bias: bool = True
    tie_embeddings: bool = True
    activation: str = "gelu"        # of the 'gelu' MLP (the 'swiglu' MLP always gates with SiLU)
    dtype: str = "float32"          # compute dtype; parameters are always float32
    remat: str = "none"             # 'none' or a key of REMAT_POLICIES
    norm: str = "layernorm"         # 'layernorm' | 'rmsnorm' (learnable scale, float32)
    norm_eps: float = 1e-5          # epsilon of either norm (LLaMA: 1e-5 or 1e-6)
    mlp: str = "gelu"               # 'gelu' (fc_in/activation/fc_out) | 'swiglu' (gate/up/down)
    mlp_hidden: int | None = None   # MLP hidden size; None = mlp_ratio * embed_dim
    positions: str = "learned"      # 'learned' (pos_embed, max_len enforced) | 'rope' | 'alibi'
    rope_theta: float = 10000.0     # RoPE base (LLaMA 3: 500000)
    num_kv_heads: int | None = None  # key/value heads (GQA/MQA); None = num_heads
    norm_position: str = "pre"      # 'pre' (GPT-2, LLaMA: x + f(norm(x)), a final norm) |
                                    # 'post' (BERT, the original Transformer: norm(x + f(x)))
    attention_impl: str = "xla"     # 'xla' (naive) | 'blockwise' (FlashAttention-style, any
                                    # backend) | 'cudnn' | 'pallas' (GPU/TPU): research.nn.flash
    # Mixture of experts (research.nn.moe): moe_experts > 0 replaces the MLP of every
    # moe_every-th block (the last of each group) by moe_experts expert MLPs of mlp_hidden_dim.
    moe_experts: int = 0
    moe_top_k: int = 1              # 1 (Switch) | 2 (GShard)
    moe_capacity_factor: float = 1.25
    moe_aux_loss: float = 0.01      # load-balancing loss coefficient (Switch's alpha)
    moe_z_loss: float = 1e-3        # router z-loss coefficient (ST-MoE)
    moe_every: int = 1

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size > 0,
            "num_layers": self.num_layers > 0,
            "num_heads": self.num_heads > 0,
            "embed_dim": self.embed_dim > 0 and self.embed_dim % max(self.num_heads, 1) == 0,
            "max_len": self.max_len > 0,
            "mlp_ratio": self.mlp_ratio > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "activation": self.activation in ACTIVATIONS,
            "dtype": self.dtype in DTYPES,
            "remat": self.remat == "none" or self.remat in REMAT_POLICIES,
            "norm": self.norm in NORMS,
            "norm_eps": self.norm_eps > 0,
            "norm_position": self.norm_position in NORM_POSITIONS,
            "mlp": self.mlp in MLPS,
            "mlp_hidden": self.mlp_hidden is None or self.mlp_hidden > 0,
            "positions": self.positions in POSITIONS and (
                self.positions != "rope" or self.embed_dim // max(self.num_heads, 1) % 2 == 0),
            "rope_theta": self.rope_theta > 0,
            "attention_impl": self.attention_impl in ATTENTION_IMPLS,
            "moe_experts": self.moe_experts >= 0 and (self.moe_experts == 0 or (
                self.mlp == "gelu" and self.moe_top_k <= self.moe_experts)),
            "moe_top_k": self.moe_top_k in MOE_ROUTINGS,
            "moe_capacity_factor": self.moe_capacity_factor > 0,
            "moe_aux_loss": self.moe_aux_loss >= 0,
            "moe_z_loss": self.moe_z_loss >= 0,
            "moe_every": self.moe_every >= 1,
            "num_kv_heads": self.num_kv_heads is None or (
                self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0),
        }
        hints = {
            "embed_dim": f"a positive multiple of num_heads={self.num_heads}",
            "dropout": "in [0, 1)",
            "activation": f"one of {sorted(ACTIVATIONS)}",
            "dtype": f"one of {sorted(DTYPES)}",
            "remat": f"'none' or one of {sorted(REMAT_POLICIES)}",
            "norm": f"one of {list(NORMS)}",
            "norm_position": f"one of {list(NORM_POSITIONS)}",
            "mlp": f"one of {list(MLPS)}",
            "mlp_hidden": "None or a positive int",
            "positions": f"one of {list(POSITIONS)}; 'rope' needs an even head_dim = embed_dim / "
                         f"num_heads (here {self.embed_dim}/{self.num_heads})",
            "num_kv_heads": f"None or a positive divisor of num_heads={self.num_heads}",
            "attention_impl": f"one of {list(ATTENTION_IMPLS)}",
            "moe_experts": f"0 (dense) or a number of experts >= moe_top_k={self.moe_top_k}, "
                           "with mlp='gelu'",
            "moe_top_k": f"one of {list(MOE_ROUTINGS)}",
            "moe_aux_loss": "a coefficient >= 0",
            "moe_z_loss": "a coefficient >= 0",
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"config.model.{key}={getattr(self, key)!r} is invalid: expected "
                    f"{hints.get(key, 'a positive value')}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> "TransformerConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"Unknown config.model keys {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**{**dict(d), **overrides})

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return self.mlp_hidden or self.mlp_ratio * self.embed_dim

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def make_norm(cfg: TransformerConfig, name: str | None = None) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, name=name)
    return layer_norm(use_bias=cfg.use_bias, epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                      name=name)


class Block(nn.Module):
    """A transformer block. Pre-norm (``cfg.norm_position='pre'``): x + Attn(Norm(x)), then
    x + MLP(Norm(x)); post-norm: Norm(x + Attn(x)), then Norm(x + MLP(x)).

    ``causal=False`` makes the self-attention bidirectional (encoders; ``mask`` [B, 1, 1, S] for
    padding). ``cross=True`` adds a cross-attention sub-layer between the two (``cross_attn``,
    ``cross_norm``) attending to ``context`` under ``context_mask`` (encoder-decoder models).
    """

    cfg: TransformerConfig
    causal: bool = True
    cross: bool = False
    moe: bool = False  # a mixture-of-experts MLP (cfg.moe_*) instead of the dense one

    @nn.compact
    def __call__(self, x, cache: Cache | None = None, index=None, deterministic: bool = True,
                 mask=None, context=None, context_mask=None):
        cfg = self.cfg
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)
        pre = cfg.norm_position == "pre"

        def sublayer(x, norm_name, f):
            h = f(make_norm(cfg, name=norm_name)(x) if pre else x)
            x = x + dropout(h)
            return x if pre else make_norm(cfg, name=norm_name)(x)

        def attention(name, causal, positions):
            return MultiHeadAttention(
                num_heads=cfg.num_heads, head_dim=cfg.head_dim, dropout=cfg.dropout,
                use_bias=cfg.use_bias, out_init_std=out_std, dtype=cfg.compute_dtype,
                num_kv_heads=cfg.kv_heads, rope_theta=cfg.rope_theta, positions=positions,
                causal=causal, attention_impl=cfg.attention_impl, name=name)

        positions = None if cfg.positions == "learned" else cfg.positions
        new_cache = []

        def self_attn(h):
            out, c = attention("attn", self.causal, positions)(
                h, cache=cache, index=index, deterministic=deterministic, mask=mask)
            new_cache.append(c)
            return out

        x = sublayer(x, "attn_norm", self_attn)
        if self.cross:
            if context is None:
                raise ValueError("A Block with cross=True needs `context` (the encoder output).")
            x = sublayer(x, "cross_norm", lambda h: attention("cross_attn", False, None)(
                h, context=context, mask=context_mask, deterministic=deterministic)[0])
        if self.moe:
            mlp = MoeMlp(cfg.moe_experts, cfg.mlp_hidden_dim, top_k=cfg.moe_top_k,
                         capacity_factor=cfg.moe_capacity_factor, aux_loss_coef=cfg.moe_aux_loss,
                         z_loss_coef=cfg.moe_z_loss, activation=cfg.activation,
                         out_init_std=out_std, dtype=cfg.compute_dtype, name="moe")
        elif cfg.mlp == "swiglu":
            mlp = SwiGluMlp(cfg.mlp_hidden_dim, use_bias=cfg.use_bias, out_init_std=out_std,
                            dtype=cfg.compute_dtype, name="mlp")
        else:
            mlp = Mlp(cfg.mlp_hidden_dim, activation=cfg.activation, use_bias=cfg.use_bias,
                      out_init_std=out_std, dtype=cfg.compute_dtype, name="mlp")
        x = sublayer(x, "mlp_norm", mlp)
        return x, new_cache[0]


class Decoder(nn.Module):
    """Decoder-only transformer language model."""

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        self.token_embed = nn.Embed(
            cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype,
            embedding_init=logical(normal_init(0.02), ("vocab", "embed")),
        )
        if cfg.positions == "learned":
            self.pos_embed = self.param("pos_embed", logical(normal_init(0.02), (None, "embed")),
                                        (cfg.max_len, cfg.embed_dim))
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(4,))
        self.blocks = [block(cfg, moe=cfg.moe_experts > 0 and i % cfg.moe_every == cfg.moe_every - 1,
                             name=f"layer_{i}") for i in range(cfg.num_layers)]
        if cfg.norm_position == "pre":
            self.final_norm = make_norm(cfg)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                kernel_init=logical(normal_init(0.02), ("embed", "vocab")))

    def _forward(self, tokens, positions, caches, index, deterministic):
        x, new_caches = self._trunk(tokens, positions, caches, index, deterministic)
        return self.head(x), new_caches

    def head(self, x: jax.Array) -> jax.Array:
        """Final hidden states [..., E] -> logits [..., vocab] (float32)."""
        if self.cfg.tie_embeddings:
            logits = self.token_embed.attend(x)
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    def _trunk(self, tokens, positions, caches, index, deterministic):
        x = self.token_embed(tokens)
        if self.cfg.positions == "learned":
            x = x + self.pos_embed[positions].astype(self.cfg.compute_dtype)
        x = self.embed_dropout(x, deterministic=deterministic)
        new_caches = {}
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[f"layer_{i}"]
            x, new_caches[f"layer_{i}"] = block(x, cache, index, deterministic)
            x = constrain(x, ("act_batch", "act_length", "act_embed"), "residual stream")
        if self.cfg.norm_position == "pre":
            x = self.final_norm(x)
        return x, (None if caches is None else new_caches)

    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """tokens [B, T] -> logits [B, T, vocab] (float32)."""
        self._check_length(tokens.shape[1])
        logits, _ = self._forward(tokens, jnp.arange(tokens.shape[1]), None, None, deterministic)
        return logits

    def hidden(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """tokens [B, T] -> final hidden states [B, T, E] (after the final norm), the input of the
        output head: for scalar heads (reward and value models) and feature extraction.
        ``Decoder.apply({'params': p}, tokens, method='hidden')``."""
        self._check_length(tokens.shape[1])
        x, _ = self._trunk(tokens, jnp.arange(tokens.shape[1]), None, None, deterministic)
        return x

    def decode(self, tokens: jax.Array, caches: dict[str, Cache], index: jax.Array):
        """Run new tokens [B, T] at positions [index, index+T), reading/writing the KV caches."""
        self._check_length(tokens.shape[1])
        cache_len = jax.tree.leaves(caches)[0].shape[1]
        if tokens.shape[1] > cache_len:
            raise ValueError(f"{tokens.shape[1]} new tokens do not fit the KV cache of length "
                             f"{cache_len}; pass a longer max_len to init_caches.")
        positions = index + jnp.arange(tokens.shape[1])
        return self._forward(tokens, positions, caches, index, True)

    def _check_length(self, t: int):
        # Only learned positions have a table of max_len rows; RoPE and ALiBi extend to any length.
        if self.cfg.positions == "learned" and t > self.cfg.max_len:
            raise ValueError(
                f"Sequence length {t} exceeds the model's context config.model.max_len="
                f"{self.cfg.max_len}; crop the input or raise max_len.")


def init_caches(cfg: TransformerConfig, batch: int, max_len: int | None = None) -> dict[str, Cache]:
    """Empty KV caches for ``Decoder.decode`` (one per layer, ``cfg.kv_heads`` heads), in the
    compute dtype."""
    max_len = max_len or cfg.max_len
    return {f"layer_{i}": init_cache(batch, max_len, cfg.kv_heads, cfg.head_dim, cfg.compute_dtype)
            for i in range(cfg.num_layers)}


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def flops_per_token(cfg: TransformerConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT's estimate_mfu:
    6 N + 12 L H Q T, with N the parameter count excluding position embeddings."""
    n = n_params - (cfg.max_len * cfg.embed_dim if cfg.positions == "learned" else 0)
    if cfg.moe_experts:  # MoE: only the top_k experts a token is routed to are active
        moe_layers = cfg.num_layers // cfg.moe_every
        n -= moe_layers * (cfg.moe_experts - cfg.moe_top_k) * 2 * cfg.embed_dim * cfg.mlp_hidden_dim
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
