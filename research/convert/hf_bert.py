"""Hugging Face ``BertForMaskedLM`` checkpoints <-> ``research.models.encoder.Encoder`` parameters.

    cfg, enc, params = load_hf_bert("bert-base-uncased")   # a hub name or a save_pretrained folder
    logits = Encoder(cfg, enc).apply({"params": params}, tokens, token_types, padding)
    save_hf_bert(params, cfg, enc, "out/")                  # BertForMaskedLM.from_pretrained("out/")

The two compute the same function: BERT is a post-LayerNorm bidirectional encoder with learned
positions, token-type embeddings, an embedding LayerNorm, biases everywhere and a masked-LM head
(dense -> activation -> LayerNorm -> the output projection tied to the word embeddings + an output
bias), i.e. our ``Encoder`` with ``TransformerConfig(norm_position='post', use_bias=True,
norm_eps=layer_norm_eps, activation=hidden_act)`` and ``EncoderConfig(type_vocab_size, pad_id)``.

Layout (Hugging Face name -> ours; ``bert.`` prefix on the encoder, layer ``i`` -> ``layer_i``;
``nn.Linear`` weights are ``[out, in]``, our kernels ``[in, out]`` with heads split as ``[H, D]``):

    embeddings.word_embeddings.weight [V, E]        token_embed/embedding
    embeddings.position_embeddings.weight [P, E]    pos_embed
    embeddings.token_type_embeddings.weight [T, E]  type_embed
    embeddings.LayerNorm.{weight,bias}              embed_norm/{scale,bias}
    encoder.layer.i.attention.self.{query,key,value}.weight [HD, E] / .bias [HD]
                                                    layer_i/attn/{query,key,value}/kernel [E, H, D]
                                                    / bias [H, D]
    encoder.layer.i.attention.output.dense.weight [E, HD]  layer_i/attn/out/kernel [H, D, E]
    encoder.layer.i.attention.output.LayerNorm      layer_i/attn_norm
    encoder.layer.i.intermediate.dense              layer_i/mlp/fc_in
    encoder.layer.i.output.dense                    layer_i/mlp/fc_out
    encoder.layer.i.output.LayerNorm                layer_i/mlp_norm
    cls.predictions.transform.dense                 mlm_dense
    cls.predictions.transform.LayerNorm             mlm_norm
    cls.predictions.decoder.bias [V]                mlm_bias (transformers ties cls.predictions.bias
                                                    to it; the forward pass uses decoder.bias)
    cls.predictions.decoder.weight [V, E]           tied to the word embeddings (or
                                                    mlm_decoder/kernel [E, V] when untied)

Import takes ``BertForMaskedLM.state_dict()`` (torch tensors or arrays, any float dtype; the result
is float32 numpy), ignores the ``position_ids`` / ``token_type_ids`` buffers and the parts
``BertForMaskedLM`` does not compute (``bert.pooler.*``, ``cls.seq_relationship.*`` of
``BertForPreTraining`` checkpoints). Export writes exactly the keys of
``BertForMaskedLM.state_dict()``. Shapes are checked against ``jax.eval_shape`` of the encoder's
init, and an error names the first tensor (in checkpoint order) that is missing or mismatched.

torch and transformers are needed only by ``load_hf_bert``, ``save_hf_bert`` and
``config_to_hf_bert``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from types import SimpleNamespace
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from research.convert import hf_gpt2
from research.convert.hf_gpt2 import ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF
from research.core.config import ConfigError
from research.models.encoder import Encoder, EncoderConfig
from research.models.transformer import TransformerConfig

_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")  # buffers (suffixes)
_IGNORED_PREFIXES = ("bert.pooler.", "pooler.", "cls.seq_relationship.")  # not in BertForMaskedLM
_PREFIX = "bert."
# TransformerConfig fields a BERT checkpoint sets, or that do not change the function computed
# (dropout acts only in training; rope_theta only with positions='rope'; mlp_ratio only when
# mlp_hidden is None). Every other field must have the BERT value in _BERT_VALUES or its default.
_BERT_FIELDS = {"vocab_size", "num_layers", "num_heads", "embed_dim", "max_len", "mlp_ratio",
                "dropout", "tie_embeddings", "activation", "dtype", "remat", "norm_eps",
                "mlp_hidden", "rope_theta"}
_BERT_VALUES = {"use_bias": True, "norm": "layernorm", "norm_position": "post", "mlp": "gelu",
                "positions": "learned"}


class HFConversionError(hf_gpt2.HFConversionError, ConfigError):
    """A BERT checkpoint or config that does not match the model it is converted to or from
    (a ``ValueError``; also a ``ConfigError`` and ``hf_gpt2.HFConversionError``)."""


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (numpy has no bfloat16: go through float32)
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


# ----------------------------------------------------------------------------------- configs

def config_from_hf_bert(hf_config: Any, **overrides) -> tuple[TransformerConfig, EncoderConfig]:
    """A ``transformers.BertConfig`` (or its ``config.json`` as a dict) -> ``(TransformerConfig,
    EncoderConfig)``. ``overrides`` (fields of either, e.g. ``dtype='bfloat16'``, ``dropout=0.0``)
    replace fields of the result. Raises ``HFConversionError`` naming the first unsupported
    option."""
    c = SimpleNamespace(**hf_config) if isinstance(hf_config, Mapping) else hf_config
    get = lambda key, default=None: getattr(c, key, default)  # noqa: E731
    model_type = get("model_type")
    if model_type not in (None, "bert"):
        raise HFConversionError(f"config model_type={model_type!r}: only BERT ('bert') "
                                "checkpoints convert with research.convert.hf_bert.")
    pos_type = get("position_embedding_type", "absolute")
    if pos_type not in (None, "absolute"):
        raise HFConversionError(f"BERT config position_embedding_type={pos_type!r} is not "
                                "supported: our Encoder has absolute learned positions.")
    for key in ("is_decoder", "add_cross_attention"):
        if get(key, False):
            raise HFConversionError(f"BERT config {key}=True is not supported: our Encoder is a "
                                    "bidirectional encoder without cross-attention.")
    act = get("hidden_act", "gelu")
    if act not in ACTIVATIONS_FROM_HF:
        raise HFConversionError(f"BERT config hidden_act={act!r} is not supported; expected one "
                                f"of {sorted(ACTIVATIONS_FROM_HF)}.")
    E, H = int(get("hidden_size")), int(get("num_attention_heads"))
    if E % H:
        raise HFConversionError(f"BERT config hidden_size={E} is not a multiple of "
                                f"num_attention_heads={H}.")
    inter = int(get("intermediate_size", 4 * E))
    kw = dict(vocab_size=int(get("vocab_size")), num_layers=int(get("num_hidden_layers")),
              num_heads=H, embed_dim=E, max_len=int(get("max_position_embeddings", 512)),
              activation=ACTIVATIONS_FROM_HF[act], norm_eps=float(get("layer_norm_eps", 1e-12)),
              tie_embeddings=bool(get("tie_word_embeddings", True)), **_BERT_VALUES)
    if inter % E == 0:
        kw["mlp_ratio"] = inter // E
    else:
        kw["mlp_hidden"] = inter
    if "dropout" not in overrides:
        rates = {float(get(k, 0.1)) for k in ("hidden_dropout_prob",
                                               "attention_probs_dropout_prob")}
        if len(rates) > 1:
            raise HFConversionError(f"BERT config hidden_dropout_prob and "
                                    f"attention_probs_dropout_prob differ ({sorted(rates)}) but "
                                    "our Encoder has one dropout rate: pass dropout=.")
        kw["dropout"] = rates.pop()
    pad = get("pad_token_id")
    ekw = dict(type_vocab_size=int(get("type_vocab_size", 2)),
               pad_id=None if pad is None else int(pad))
    e_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    ekw.update({k: v for k, v in overrides.items() if k in e_fields})
    kw.update({k: v for k, v in overrides.items() if k not in e_fields})
    return TransformerConfig(**kw), EncoderConfig(**ekw)


def _check_bert_config(cfg: TransformerConfig):
    for f in dataclasses.fields(cfg):
        if f.name in _BERT_FIELDS:
            continue
        if f.name in _BERT_VALUES:
            need = _BERT_VALUES[f.name]
        else:
            need = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if getattr(cfg, f.name) != need and not (f.name == "num_kv_heads"
                                                 and cfg.num_kv_heads == cfg.num_heads):
            raise HFConversionError(f"TransformerConfig.{f.name}={getattr(cfg, f.name)!r} has no "
                                    f"BERT equivalent (BERT needs {f.name}={need!r}).")
    if cfg.activation not in ACTIVATIONS_TO_HF:
        raise HFConversionError(f"activation={cfg.activation!r} has no BERT equivalent; "
                                f"expected one of {sorted(ACTIVATIONS_TO_HF)}.")


def config_to_hf_bert(cfg: TransformerConfig, enc: EncoderConfig, **hf_kwargs):
    """``(TransformerConfig, EncoderConfig)`` -> ``transformers.BertConfig`` (``hf_kwargs`` are
    passed on)."""
    from transformers import BertConfig

    _check_bert_config(cfg)
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_hidden_dim,
        hidden_act=ACTIVATIONS_TO_HF[cfg.activation], hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, max_position_embeddings=cfg.max_len,
        type_vocab_size=enc.type_vocab_size, layer_norm_eps=cfg.norm_eps,
        pad_token_id=enc.pad_id, tie_word_embeddings=cfg.tie_embeddings)
    return BertConfig(**{**kwargs, **hf_kwargs})


# ------------------------------------------------------------------------------- parameters
# Kinds (as in hf_llama): "copy" (same shape), "flat" (ours [*s] <-> HF [prod s]),
# "linear1"/"linear2" (ours a kernel [*in, *out] with 1 or 2 input axes <-> HF nn.Linear weight
# [prod out, prod in]).

def expected_shapes(cfg: TransformerConfig, enc: EncoderConfig) -> dict[tuple[str, ...], tuple]:
    """Our parameter paths -> shapes, from ``jax.eval_shape`` of ``Encoder(cfg, enc).init``."""
    def init():
        boxed = Encoder(cfg, enc).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
        return nn.meta.unbox(boxed)
    flat = traverse_util.flatten_dict(jax.eval_shape(init))
    return {path: tuple(x.shape) for path, x in flat.items()}


def _specs(cfg: TransformerConfig) -> list[tuple[str, str, tuple[str, ...]]]:
    """(Hugging Face name, kind, our path) in the checkpoint's order."""
    e = _PREFIX + "embeddings."
    specs = [(e + "word_embeddings.weight", "copy", ("token_embed", "embedding")),
             (e + "position_embeddings.weight", "copy", ("pos_embed",)),
             (e + "token_type_embeddings.weight", "copy", ("type_embed",)),
             (e + "LayerNorm.weight", "copy", ("embed_norm", "scale")),
             (e + "LayerNorm.bias", "copy", ("embed_norm", "bias"))]

    def linear(hf, ours, kind="linear1", bias_kind="copy"):
        return [(hf + ".weight", kind, (*ours, "kernel")), (hf + ".bias", bias_kind, (*ours, "bias"))]

    def norm(hf, ours):
        return [(hf + ".weight", "copy", (*ours, "scale")), (hf + ".bias", "copy", (*ours, "bias"))]

    for i in range(cfg.num_layers):
        h, o = f"{_PREFIX}encoder.layer.{i}.", f"layer_{i}"
        for name in ("query", "key", "value"):
            specs += linear(h + "attention.self." + name, (o, "attn", name), bias_kind="flat")
        specs += linear(h + "attention.output.dense", (o, "attn", "out"), kind="linear2")
        specs += norm(h + "attention.output.LayerNorm", (o, "attn_norm"))
        specs += linear(h + "intermediate.dense", (o, "mlp", "fc_in"))
        specs += linear(h + "output.dense", (o, "mlp", "fc_out"))
        specs += norm(h + "output.LayerNorm", (o, "mlp_norm"))
    specs += linear("cls.predictions.transform.dense", ("mlm_dense",))
    specs += norm("cls.predictions.transform.LayerNorm", ("mlm_norm",))
    if not cfg.tie_embeddings:
        specs.append(("cls.predictions.decoder.weight", "linear1", ("mlm_decoder", "kernel")))
    specs.append(("cls.predictions.decoder.bias", "copy", ("mlm_bias",)))
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
    elif kind == "flat":
        x = x.reshape(-1)
    return np.ascontiguousarray(x, np.float32)


def _plan(cfg: TransformerConfig, enc: EncoderConfig):
    """-> ([(hf name, kind, our path, hf shape)], our shapes)."""
    _check_bert_config(cfg)
    shapes = expected_shapes(cfg, enc)
    plan = []
    for name, kind, path in _specs(cfg):
        if path not in shapes:
            raise AssertionError(f"{path} not among Encoder's parameters")
        plan.append((name, kind, path, _hf_shape(kind, shapes[path])))
    if {p for _, _, p, _ in plan} != set(shapes):  # the mapping itself is wrong
        raise AssertionError("the BERT mapping does not cover Encoder's parameters")
    return plan, shapes


def from_hf_bert_state_dict(state_dict: Mapping[str, Any], cfg: TransformerConfig,
                            enc: EncoderConfig) -> dict:
    """``BertForMaskedLM.state_dict()`` (torch tensors or arrays) -> our params (nested dict of
    float32 numpy arrays, the tree of ``Encoder(cfg, enc).init(...)['params']`` unboxed).

    Raises ``HFConversionError`` naming the first tensor (in checkpoint order) that is missing or
    has the wrong shape (expected vs got), or listing keys the config has no place for.
    """
    plan, shapes = _plan(cfg, enc)
    sd = {k: v for k, v in state_dict.items()
          if not k.endswith(_IGNORED) and not k.startswith(_IGNORED_PREFIXES)}
    tied_head = sd.pop("cls.predictions.decoder.weight", None) if cfg.tie_embeddings else None
    # transformers ties cls.predictions.bias to decoder.bias (untied models: decoder.bias is the
    # one used); a checkpoint may hold either or both.
    head_bias = sd.pop("cls.predictions.bias", None)
    if "cls.predictions.decoder.bias" not in sd and head_bias is not None:
        sd["cls.predictions.decoder.bias"] = head_bias
    elif head_bias is not None and cfg.tie_embeddings and not np.array_equal(
            _np(head_bias), _np(sd["cls.predictions.decoder.bias"])):
        raise HFConversionError("BERT tensor 'cls.predictions.bias' differs from "
                                "'cls.predictions.decoder.bias' (transformers ties them).")
    flat = {}
    for name, kind, path, hf_shape in plan:
        if name not in sd:
            raise HFConversionError(f"BERT state dict has no tensor {name!r} (expected shape "
                                    f"{hf_shape}) for {cfg}.")
        got = tuple(sd[name].shape)
        if got != hf_shape:
            raise HFConversionError(f"BERT tensor {name!r} has shape {got}, expected {hf_shape} "
                                    f"for {cfg}.")
        flat[path] = _to_ours(kind, _np(sd.pop(name)), shapes[path])
    if sd:
        extra = sorted(sd)
        raise HFConversionError(f"BERT state dict has tensors with no place in {cfg}, {enc}: "
                                f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if tied_head is not None:
        emb = flat[("token_embed", "embedding")]
        if tuple(tied_head.shape) != emb.shape or not np.array_equal(_np(tied_head), emb):
            raise HFConversionError("BERT tensor 'cls.predictions.decoder.weight' differs from "
                                    "'bert.embeddings.word_embeddings.weight' but the config ties "
                                    "them (tie_word_embeddings / tie_embeddings).")
    return traverse_util.unflatten_dict(flat)


def params_to_hf_bert_state_dict(params, cfg: TransformerConfig,
                                 enc: EncoderConfig) -> dict[str, np.ndarray]:
    """Our params -> the state dict of ``transformers.BertForMaskedLM`` (float32 numpy arrays;
    exactly the keys of its ``state_dict()``, the tied ``cls.predictions.decoder.weight`` and
    ``cls.predictions.bias`` included). The exact inverse of ``from_hf_bert_state_dict``."""
    plan, shapes = _plan(cfg, enc)
    flat = hf_gpt2.flat_params_checked(params, shapes, cfg, HFConversionError)
    out = {name: _to_hf(kind, _np(flat[path])) for name, kind, path, _ in plan}
    if cfg.tie_embeddings:
        out["cls.predictions.decoder.weight"] = out[_PREFIX + "embeddings.word_embeddings.weight"]
    out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
    return out


# --------------------------------------------------------------------------------- folders

def load_hf_bert(name_or_path: str | os.PathLike, *, hf_kwargs: Mapping[str, Any] | None = None,
                 **overrides) -> tuple[TransformerConfig, EncoderConfig, dict]:
    """A hub name (e.g. 'bert-base-uncased') or a folder written by ``save_pretrained`` ->
    ``(cfg, enc, params)``. The config is checked before any weights are loaded.

    ``hf_kwargs`` go to ``from_pretrained`` (e.g. ``revision``, ``cache_dir``, ``token``);
    ``overrides`` to ``config_from_hf_bert``.
    """
    from transformers import AutoConfig, BertForMaskedLM

    hf_kwargs = dict(hf_kwargs or {})
    hf_config = AutoConfig.from_pretrained(str(name_or_path), **hf_kwargs)
    cfg, enc = config_from_hf_bert(hf_config, **overrides)
    model = BertForMaskedLM.from_pretrained(str(name_or_path), config=hf_config, **hf_kwargs)
    return cfg, enc, from_hf_bert_state_dict(model.state_dict(), cfg, enc)


def save_hf_bert(params, cfg: TransformerConfig, enc: EncoderConfig,
                 directory: str | os.PathLike, **hf_config_kwargs):
    """Write ``directory`` (config.json + model.safetensors, float32) loadable by
    ``transformers.BertForMaskedLM.from_pretrained``. ``hf_config_kwargs`` go to ``BertConfig``."""
    import torch
    from transformers import BertForMaskedLM

    state = params_to_hf_bert_state_dict(params, cfg, enc)
    model = BertForMaskedLM(config_to_hf_bert(cfg, enc, **hf_config_kwargs))
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    model.save_pretrained(str(directory))
    return directory
