"""Hugging Face LLaMA weights -> ``research.models.transformer.Decoder`` parameters.

    cfg = config_from_hf_llama(hf_model.config)
    params = from_hf_llama_state_dict(hf_model.state_dict(), cfg)
    logits = Decoder(cfg).apply({"params": params}, tokens)

A LLaMA is our ``Decoder`` with ``norm='rmsnorm'``, ``mlp='swiglu'``, ``positions='rope'`` (the HF
"rotate_half" layout, so q/k need no permutation), ``num_kv_heads`` and usually
``tie_embeddings=False``, ``use_bias=False``.

Layout (Hugging Face name -> ours, per layer ``model.layers.{i}`` -> ``layer_{i}``). ``nn.Linear``
stores ``[out, in]``, so every kernel is transposed; the q/k/v output rows are head-major
(``h * D + d``), which reshapes to our ``[embed, heads, head_dim]``:

    model.embed_tokens.weight [V, E]          token_embed/embedding [V, E]
    self_attn.q_proj.weight [H*D, E]          attn/query/kernel [E, H, D]
    self_attn.{k,v}_proj.weight [K*D, E]      attn/{key,value}/kernel [E, K, D]
    self_attn.o_proj.weight [E, H*D]          attn/out/kernel [H, D, E]
    input_layernorm.weight [E]                attn_norm/scale
    post_attention_layernorm.weight [E]       mlp_norm/scale
    mlp.{gate,up}_proj.weight [M, E]          mlp/{gate,up}/kernel [E, M]
    mlp.down_proj.weight [E, M]               mlp/down/kernel [M, E]
    model.norm.weight [E]                     final_norm/scale
    lm_head.weight [V, E]                     lm_head/kernel [E, V] (absent when tied)

Biases (``attention_bias`` / ``mlp_bias``) map to the matching ``bias`` entries when
``cfg.use_bias``. Values may be torch tensors or numpy arrays; the result is float32 numpy.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from research.core.config import ConfigError
from research.models.transformer import TransformerConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def config_from_hf_llama(hf_config, **overrides) -> TransformerConfig:
    """Our ``TransformerConfig`` for a ``transformers.LlamaConfig`` (no RoPE scaling)."""
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(f"RoPE scaling {scaling} is not supported.")
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
        raise ConfigError(f"head_dim={head_dim} != hidden_size / num_attention_heads "
                          "is not supported.")
    if getattr(hf_config, "attention_bias", False) != getattr(hf_config, "mlp_bias", False):
        raise ConfigError("attention_bias and mlp_bias must agree (one use_bias here).")
    kw = dict(
        vocab_size=hf_config.vocab_size, num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads, embed_dim=hf_config.hidden_size,
        max_len=hf_config.max_position_embeddings, mlp_hidden=hf_config.intermediate_size,
        num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        use_bias=bool(getattr(hf_config, "attention_bias", False)),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        norm="rmsnorm", norm_eps=hf_config.rms_norm_eps, mlp="swiglu", positions="rope",
        rope_theta=float(theta), dropout=0.0)
    return TransformerConfig(**{**kw, **overrides})


def from_hf_llama_state_dict(state_dict: Mapping[str, Any], cfg: TransformerConfig) -> dict:
    """``LlamaForCausalLM.state_dict()`` (or ``LlamaModel``'s, without the ``model.`` prefix) ->
    our params tree for ``Decoder(cfg)``. Missing or unused keys raise ``ConfigError``."""
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()
          if not k.endswith(_IGNORED_SUFFIXES)}
    used: set[str] = set()
    E, H, K, D = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.head_dim

    def get(name, shape):
        if name not in sd:
            raise ConfigError(f"Hugging Face LLaMA state dict lacks {name!r}.")
        used.add(name)
        x = _np(sd[name])
        if x.shape != tuple(shape):
            raise ConfigError(f"{name}: shape {x.shape}, expected {tuple(shape)} for this config.")
        return x

    def linear(prefix, out_dim, in_dim, kernel_shape=None, bias_shape=None):
        p = {"kernel": get(prefix + ".weight", (out_dim, in_dim)).T}
        if kernel_shape is not None:
            p["kernel"] = p["kernel"].reshape(kernel_shape)
        if cfg.use_bias:
            p["bias"] = get(prefix + ".bias", (out_dim,)).reshape(bias_shape or (out_dim,))
        return p

    params: dict[str, Any] = {
        "token_embed": {"embedding": get("embed_tokens.weight", (cfg.vocab_size, E))},
        "final_norm": {"scale": get("norm.weight", (E,))},
    }
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        attn = {
            "query": linear(pre + "self_attn.q_proj", H * D, E, (E, H, D), (H, D)),
            "key": linear(pre + "self_attn.k_proj", K * D, E, (E, K, D), (K, D)),
            "value": linear(pre + "self_attn.v_proj", K * D, E, (E, K, D), (K, D)),
            "out": linear(pre + "self_attn.o_proj", E, H * D, (H, D, E)),
        }
        M = cfg.mlp_hidden_dim
        params[f"layer_{i}"] = {
            "attn_norm": {"scale": get(pre + "input_layernorm.weight", (E,))},
            "attn": attn,
            "mlp_norm": {"scale": get(pre + "post_attention_layernorm.weight", (E,))},
            "mlp": {"gate": linear(pre + "mlp.gate_proj", M, E),
                    "up": linear(pre + "mlp.up_proj", M, E),
                    "down": linear(pre + "mlp.down_proj", E, M)},
        }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", (cfg.vocab_size, E)).T}
    elif "lm_head.weight" in sd:  # tied checkpoints may still list it; it must be the embedding
        if not np.array_equal(_np(sd["lm_head.weight"]), params["token_embed"]["embedding"]):
            raise ConfigError("cfg.tie_embeddings=True but lm_head.weight differs from "
                              "embed_tokens.weight.")
        used.add("lm_head.weight")
    unused = sorted(set(sd) - used)
    if unused:
        raise ConfigError(f"Unused Hugging Face LLaMA weights {unused[:8]}"
                          f"{' ...' if len(unused) > 8 else ''}: does cfg match the checkpoint?")
    return _contiguous(params)


def _contiguous(tree):
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, np.float32)
