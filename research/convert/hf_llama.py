"""Hugging Face LLaMA checkpoints <-> ``research.models.transformer.Decoder`` parameters.

    cfg, params = load_hf_llama("meta-llama/Llama-3.2-1B")  # hub name or save_pretrained folder
    logits = Decoder(cfg).apply({"params": params}, tokens)
    save_hf_llama(params, cfg, "out/")                  # LlamaForCausalLM.from_pretrained("out/")

    cfg = config_from_hf_llama(hf_model.config)         # the pieces, for a model in memory
    params = from_hf_llama_state_dict(hf_model.state_dict(), cfg)
    state = params_to_hf_llama_state_dict(params, cfg)  # the exact inverse

A LLaMA is our ``Decoder`` with ``norm='rmsnorm'``, ``mlp='swiglu'``, ``positions='rope'`` (the HF
"rotate_half" layout, so q/k need no permutation), ``num_kv_heads`` and usually
``tie_embeddings=False``, ``use_bias=False``. Unsupported Hugging Face options (RoPE scaling,
a ``head_dim`` other than ``hidden_size / num_attention_heads``, ``attention_bias`` without
``mlp_bias`` or the reverse, an activation other than SiLU) raise ``HFConversionError`` naming the
option, before any weights are read.

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
    lm_head.weight [V, E]                     lm_head/kernel [E, V] (the embedding when tied)

Biases (``attention_bias`` and ``mlp_bias``, both or neither) map to the matching ``bias``
entries when ``cfg.use_bias`` (q/k/v biases ``[H*D]`` -> ``[H, D]``). Import accepts the keys of
``LlamaForCausalLM`` (``model.`` prefix) or of ``LlamaModel`` (no prefix), ignores
``rotary_emb.inv_freq`` buffers, and takes torch tensors or numpy arrays (any float dtype); the
result is float32 numpy. Export writes exactly the keys of ``LlamaForCausalLM.state_dict()``
(``lm_head.weight`` included when tied). Shapes are checked against ``jax.eval_shape`` of
``Decoder(cfg).init``; the error names the first mismatched tensor with expected and actual
shapes.

torch and transformers are needed only by ``load_hf_llama``, ``save_hf_llama`` and
``config_to_hf_llama``.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from research.convert import hf_gpt2
from research.convert.hf_gpt2 import expected_shapes
from research.core.config import ConfigError
from research.models.transformer import TransformerConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PREFIX = "model."
# TransformerConfig fields a LLaMA sets, or that do not change the function computed (dropout
# acts only in training; activation is the GELU MLP's, unused by SwiGLU; mlp_ratio only when
# mlp_hidden is None). Every other field must have the LLaMA value in _LLAMA_VALUES.
_LLAMA_FIELDS = {"vocab_size", "num_layers", "num_heads", "embed_dim", "max_len", "mlp_ratio",
                 "dropout", "use_bias", "tie_embeddings", "activation", "dtype", "remat",
                 "norm_eps", "mlp_hidden", "rope_theta", "num_kv_heads"}
_LLAMA_VALUES = {"norm": "rmsnorm", "mlp": "swiglu", "positions": "rope"}


class HFConversionError(hf_gpt2.HFConversionError, ConfigError):
    """A LLaMA checkpoint or config that does not match the model it is converted to or from
    (a ``ValueError``; also a ``ConfigError`` and ``hf_gpt2.HFConversionError``)."""


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (numpy has no bfloat16: go through float32)
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


# ----------------------------------------------------------------------------------- configs

def _rope(c) -> tuple[dict, float]:
    """(the RoPE parameters dict, theta). transformers >= 5 keeps both in ``rope_parameters``
    (``rope_scaling`` is an alias); older versions have ``rope_theta`` and ``rope_scaling``."""
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    theta = getattr(c, "rope_theta", None)
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    return dict(params), float(theta)


def config_from_hf_llama(hf_config: Any, **overrides) -> TransformerConfig:
    """A ``transformers.LlamaConfig`` (or its ``config.json`` as a dict) -> ``TransformerConfig``.

    ``overrides`` (e.g. ``dtype='bfloat16'``, ``max_len=``) replace fields of the result. Raises
    ``HFConversionError`` naming the first unsupported option.
    """
    c = SimpleNamespace(**hf_config) if isinstance(hf_config, Mapping) else hf_config
    get = lambda key, default=None: getattr(c, key, default)  # noqa: E731
    model_type = get("model_type")
    if model_type not in (None, "llama"):
        raise HFConversionError(f"config model_type={model_type!r}: only LLaMA ('llama') "
                                "checkpoints convert with research.convert.hf_llama.")
    rope, theta = _rope(c)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or rope.get("factor") not in (None, 1, 1.0):
        raise HFConversionError(f"LLaMA config rope_scaling/rope_parameters={rope} is not "
                                "supported: RoPE scaling (rope_type != 'default') has no "
                                "equivalent in our Decoder.")
    E, H = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = get("head_dim")
    if head_dim is not None and int(head_dim) * H != E:
        raise HFConversionError(f"LLaMA config head_dim={head_dim} is not supported: our Decoder "
                                f"has head_dim = hidden_size / num_attention_heads = {E}/{H}.")
    attention_bias, mlp_bias = bool(get("attention_bias", False)), bool(get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise HFConversionError(f"LLaMA config attention_bias={attention_bias} with "
                                f"mlp_bias={mlp_bias} is not supported: our Decoder has one "
                                "use_bias for attention and MLP (both or neither).")
    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFConversionError(f"LLaMA config hidden_act={act!r} is not supported: our SwiGLU "
                                "MLP gates with SiLU.")
    if get("sliding_window") is not None:
        raise HFConversionError(f"LLaMA config sliding_window={get('sliding_window')} is not "
                                "supported: our attention is full causal.")
    kw = dict(
        vocab_size=int(get("vocab_size")), num_layers=int(get("num_hidden_layers")),
        num_heads=H, embed_dim=E, max_len=int(get("max_position_embeddings", 2048)),
        mlp_hidden=int(get("intermediate_size")),
        num_kv_heads=int(get("num_key_value_heads") or H), use_bias=attention_bias,
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        norm="rmsnorm", norm_eps=float(get("rms_norm_eps", 1e-6)), mlp="swiglu",
        positions="rope", rope_theta=theta, dropout=0.0)
    return TransformerConfig(**{**kw, **overrides})


def _check_llama_config(cfg: TransformerConfig):
    for f in dataclasses.fields(cfg):
        if f.name in _LLAMA_FIELDS:
            continue
        if f.name in _LLAMA_VALUES:
            need = _LLAMA_VALUES[f.name]
        else:
            need = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if getattr(cfg, f.name) != need:
            raise HFConversionError(f"TransformerConfig.{f.name}={getattr(cfg, f.name)!r} has no "
                                    f"LLaMA equivalent (a LLaMA needs {f.name}={need!r}).")


def config_to_hf_llama(cfg: TransformerConfig, **hf_kwargs):
    """``TransformerConfig`` -> ``transformers.LlamaConfig`` (``hf_kwargs`` are passed on, e.g.
    ``bos_token_id``, ``eos_token_id``, ``pad_token_id``)."""
    from transformers import LlamaConfig

    _check_llama_config(cfg)
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_hidden_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias, attention_dropout=cfg.dropout)
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:  # transformers < 5
        kwargs["rope_theta"] = cfg.rope_theta
    return LlamaConfig(**{**kwargs, **hf_kwargs})


# ------------------------------------------------------------------------------- parameters
# Kinds: "copy" (same shape), "flat" (ours [*s] <-> HF [prod s]), "linear1"/"linear2" (ours a
# kernel [*in, *out] with 1 or 2 input axes <-> HF nn.Linear weight [prod out, prod in]).

def _specs(cfg: TransformerConfig) -> list[tuple[str, str, tuple[str, ...]]]:
    """(Hugging Face name without ``model.``, kind, our path) in the checkpoint's order."""
    specs = [("embed_tokens.weight", "copy", ("token_embed", "embedding"))]
    for i in range(cfg.num_layers):
        h, o = f"layers.{i}.", f"layer_{i}"
        for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                         ("o_proj", "out")):
            specs.append((f"{h}self_attn.{hf}.weight", "linear2" if ours == "out" else "linear1",
                          (o, "attn", ours, "kernel")))
            if cfg.use_bias:
                specs.append((f"{h}self_attn.{hf}.bias", "flat", (o, "attn", ours, "bias")))
        for hf, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            specs.append((f"{h}mlp.{hf}.weight", "linear1", (o, "mlp", ours, "kernel")))
            if cfg.use_bias:
                specs.append((f"{h}mlp.{hf}.bias", "flat", (o, "mlp", ours, "bias")))
        specs += [(h + "input_layernorm.weight", "copy", (o, "attn_norm", "scale")),
                  (h + "post_attention_layernorm.weight", "copy", (o, "mlp_norm", "scale"))]
    specs.append(("norm.weight", "copy", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        specs.append(("lm_head.weight", "linear1", ("lm_head", "kernel")))
    return specs


def _hf_shape(kind: str, s: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "copy":
        return s
    if kind == "flat":
        return (math.prod(s),)
    n_in = int(kind[-1])
    return (math.prod(s[n_in:]), math.prod(s[:n_in]))


def _to_ours(kind: str, x: np.ndarray, s: tuple[int, ...]) -> np.ndarray:
    if kind.startswith("linear"):
        x = x.T
    return np.ascontiguousarray(x.reshape(s), np.float32)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind.startswith("linear"):
        n_in = int(kind[-1])
        x = x.reshape(math.prod(x.shape[:n_in]), -1).T
    else:
        x = x.reshape(-1) if kind == "flat" else x
    return np.ascontiguousarray(x, np.float32)


def _plan(cfg: TransformerConfig):
    """-> ([(hf name, kind, our path, hf shape)], our shapes)."""
    _check_llama_config(cfg)
    shapes = expected_shapes(cfg)
    plan = []
    for name, kind, path in _specs(cfg):
        if path not in shapes:
            raise AssertionError(f"{path} not among Decoder's parameters")
        plan.append((name, kind, path, _hf_shape(kind, shapes[path])))
    if {p for _, _, p, _ in plan} != set(shapes):  # the mapping itself is wrong
        raise AssertionError("the LLaMA mapping does not cover Decoder's parameters")
    return plan, shapes


def from_hf_llama_state_dict(state_dict: Mapping[str, Any], cfg: TransformerConfig) -> dict:
    """``LlamaForCausalLM.state_dict()`` (or ``LlamaModel``'s, without the ``model.`` prefix;
    torch tensors or arrays) -> our params (nested dict of float32 numpy arrays, the tree of
    ``Decoder(cfg).init(...)['params']`` unboxed).

    Raises ``HFConversionError`` naming the first tensor (in checkpoint order) that is missing or
    has the wrong shape (expected vs got), or listing keys the config has no place for.
    """
    plan, shapes = _plan(cfg)
    sd, keys = {}, {}  # keys: our name -> the key as given
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        name = key.removeprefix(_PREFIX)
        sd[name], keys[name] = value, key
    tied_head = sd.pop("lm_head.weight", None) if cfg.tie_embeddings else None
    flat = {}
    for name, kind, path, hf_shape in plan:
        if name not in sd:
            raise HFConversionError(f"LLaMA state dict has no tensor {name!r} (expected shape "
                                    f"{hf_shape}) for {cfg}.")
        got = tuple(sd[name].shape)
        if got != hf_shape:
            raise HFConversionError(f"LLaMA tensor {keys[name]!r} has shape {got}, expected "
                                    f"{hf_shape} for {cfg}.")
        flat[path] = _to_ours(kind, _np(sd.pop(name)), shapes[path])
    if sd:
        extra = sorted(keys[k] for k in sd)
        raise HFConversionError(f"LLaMA state dict has tensors with no place in {cfg}: "
                                f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if tied_head is not None:
        emb = flat[("token_embed", "embedding")]
        if tuple(tied_head.shape) != emb.shape or not np.array_equal(_np(tied_head), emb):
            raise HFConversionError("LLaMA tensor 'lm_head.weight' differs from "
                                    "'model.embed_tokens.weight' but the config ties them "
                                    "(tie_word_embeddings / tie_embeddings).")
    return traverse_util.unflatten_dict(flat)


def params_to_hf_llama_state_dict(params, cfg: TransformerConfig) -> dict[str, np.ndarray]:
    """Our params -> the state dict of ``transformers.LlamaForCausalLM`` (float32 numpy arrays;
    keys as in its ``state_dict()``, ``lm_head.weight`` included even when tied). The exact
    inverse of ``from_hf_llama_state_dict``."""
    plan, shapes = _plan(cfg)
    flat = hf_gpt2.flat_params_checked(params, shapes, cfg, HFConversionError)
    out = {}
    for name, kind, path, _ in plan:
        out[name if name.startswith("lm_head.") else _PREFIX + name] = _to_hf(kind, _np(flat[path]))
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out[_PREFIX + "embed_tokens.weight"]
    return out


# --------------------------------------------------------------------------------- folders

def load_hf_llama(name_or_path: str | os.PathLike, *, hf_kwargs: Mapping[str, Any] | None = None,
                  **overrides) -> tuple[TransformerConfig, dict]:
    """A hub name (e.g. 'meta-llama/Llama-3.2-1B') or a folder written by ``save_pretrained`` ->
    (cfg, params). The config is checked before any weights are loaded.

    ``hf_kwargs`` go to ``from_pretrained`` (e.g. ``revision``, ``cache_dir``, ``token``);
    ``overrides`` to ``config_from_hf_llama``.
    """
    from transformers import AutoConfig, LlamaForCausalLM

    hf_kwargs = dict(hf_kwargs or {})
    hf_config = AutoConfig.from_pretrained(str(name_or_path), **hf_kwargs)
    cfg = config_from_hf_llama(hf_config, **overrides)
    model = LlamaForCausalLM.from_pretrained(str(name_or_path), config=hf_config, **hf_kwargs)
    params = from_hf_llama_state_dict(model.state_dict(), cfg)
    return cfg, params


def save_hf_llama(params, cfg: TransformerConfig, directory: str | os.PathLike,
                  **hf_config_kwargs):
    """Write ``directory`` (config.json + model.safetensors, float32) loadable by
    ``transformers.LlamaForCausalLM.from_pretrained``. ``hf_config_kwargs`` go to ``LlamaConfig``
    (e.g. ``bos_token_id``, ``eos_token_id``)."""
    import torch
    from transformers import LlamaForCausalLM

    state = params_to_hf_llama_state_dict(params, cfg)
    model = LlamaForCausalLM(config_to_hf_llama(cfg, **hf_config_kwargs))
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    model.save_pretrained(str(directory))
    return directory
