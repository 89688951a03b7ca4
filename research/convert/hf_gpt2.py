"""Hugging Face GPT-2 checkpoints <-> ``research.models.transformer.Decoder`` parameters.

    cfg, params = load_hf("gpt2")                    # a hub name, or a save_pretrained folder
    logits = Decoder(cfg).apply({"params": params}, tokens)
    save_hf(params, cfg, "out/")                     # GPT2LMHeadModel.from_pretrained("out/")

The two models compute the same function: GPT-2 is a pre-LayerNorm decoder with learned
positions, biases everywhere, LayerNorm epsilon 1e-5, the tanh GELU (``gelu_new``) and the output
projection tied to the token embedding, which is our ``Decoder`` with ``use_bias=True``,
``activation='gelu_tanh'`` and ``tie_embeddings=True``. Another ``layer_norm_epsilon`` or an
``n_inner`` that is no multiple of ``n_embd`` maps to ``norm_eps`` / ``mlp_hidden`` where
``TransformerConfig`` has those fields, and is rejected where it does not.

Layout (Hugging Face name -> ours, per layer ``h.{i}`` -> ``layer_{i}``). GPT-2's ``Conv1D``
stores its weight as ``[in, out]`` (the transpose of ``nn.Linear``), so kernels copy across
without a transpose:

    wte.weight [V, E]             token_embed/embedding [V, E]
    wpe.weight [P, E]             pos_embed [P, E]
    h.i.ln_1.{weight,bias}        layer_i/attn_norm/{scale,bias}
    h.i.attn.c_attn.weight [E,3E] layer_i/attn/{query,key,value}/kernel [E, H, D] (q | k | v blocks,
                                  each block's columns ordered head-major: h * D + d)
    h.i.attn.c_attn.bias [3E]     layer_i/attn/{query,key,value}/bias [H, D]
    h.i.attn.c_proj.weight [E,E]  layer_i/attn/out/kernel [H, D, E]; .bias [E] -> out/bias
    h.i.ln_2.{weight,bias}        layer_i/mlp_norm/{scale,bias}
    h.i.mlp.c_fc.{weight,bias}    layer_i/mlp/fc_in/{kernel [E, M], bias}
    h.i.mlp.c_proj.{weight,bias}  layer_i/mlp/fc_out/{kernel [M, E], bias}
    ln_f.{weight,bias}            final_norm/{scale,bias}
    lm_head.weight [V, E]         tied to wte (or lm_head/kernel [E, V] if untied)

Import accepts the keys of ``GPT2LMHeadModel`` (``transformer.`` prefix) or of ``GPT2Model`` (no
prefix) and ignores the old causal-mask buffers ``attn.bias`` / ``attn.masked_bias``. Export
writes exactly the keys of ``GPT2LMHeadModel.state_dict()``. A model without biases
(``use_bias=False``) exports with zero biases (the same function) and imports back only from
all-zero biases.

torch and transformers are needed only by ``load_hf``, ``save_hf`` and ``config_to_hf``.
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

from research.models.transformer import Decoder, TransformerConfig

# Hugging Face ``activation_function`` -> ours. gelu_new and gelu_pytorch_tanh are the same tanh
# approximation; "gelu" is the exact erf form.
ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                       "gelu": "gelu", "relu": "relu"}
ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
LAYER_NORM_EPS = 1e-5  # research.nn.layers.layer_norm's default epsilon
# TransformerConfig fields a GPT-2 checkpoint sets or that do not change the function computed;
# every other field must keep its default for the model to be a GPT-2. ``norm_eps`` and
# ``mlp_hidden`` are used where TransformerConfig has them (without them the LayerNorm epsilon is
# fixed at 1e-5 and the MLP width is a multiple of embed_dim).
_GPT2_FIELDS = {"vocab_size", "num_layers", "num_heads", "embed_dim", "max_len", "mlp_ratio",
                "dropout", "use_bias", "tie_embeddings", "activation", "dtype", "remat",
                "norm_eps", "mlp_hidden"}
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints
_PREFIX = "transformer."


class HFConversionError(ValueError):
    """A checkpoint or config that does not match the model it is converted to or from."""


# ----------------------------------------------------------------------------------- configs

def config_from_hf(hf_config: Any, **overrides) -> TransformerConfig:
    """A ``transformers.GPT2Config`` (or its ``config.json`` as a dict) -> ``TransformerConfig``.

    ``dropout`` is the checkpoint's (``resid_pdrop`` = ``embd_pdrop`` = ``attn_pdrop``; pass
    ``dropout=`` if they differ); it only acts when training. ``overrides`` (e.g.
    ``dtype='bfloat16'``, ``dropout=0.0``) replace fields of the result.
    """
    c = SimpleNamespace(**hf_config) if isinstance(hf_config, Mapping) else hf_config
    has = {f.name for f in dataclasses.fields(TransformerConfig)}
    fields = {}
    get = lambda key, default=None: getattr(c, key, default)  # noqa: E731
    model_type = get("model_type")
    if model_type not in (None, "gpt2"):
        raise HFConversionError(f"config model_type={model_type!r}: only GPT-2 ('gpt2') "
                                "checkpoints convert with research.convert.hf_gpt2.")
    unsupported = {"add_cross_attention": (get("add_cross_attention", False), False),
                   "scale_attn_weights": (get("scale_attn_weights", True), True),
                   "scale_attn_by_inverse_layer_idx":
                       (get("scale_attn_by_inverse_layer_idx", False), False)}
    for key, (value, supported) in unsupported.items():
        if bool(value) != supported:
            raise HFConversionError(f"GPT-2 config {key}={value!r} is not supported (our Decoder "
                                    f"has the equivalent of {key}={supported}).")
    eps = float(get("layer_norm_epsilon", LAYER_NORM_EPS))
    if "norm_eps" in has:
        fields["norm_eps"] = eps
    elif not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-9):
        raise HFConversionError(f"GPT-2 config layer_norm_epsilon={eps!r}: our LayerNorm's "
                                f"epsilon is fixed at {LAYER_NORM_EPS}; the logits would differ.")
    act = get("activation_function", "gelu_new")
    if act not in ACTIVATIONS_FROM_HF:
        raise HFConversionError(f"GPT-2 config activation_function={act!r} is not supported; "
                                f"expected one of {sorted(ACTIVATIONS_FROM_HF)}.")
    embed_dim = int(get("n_embd"))
    n_inner = get("n_inner")
    if n_inner is None or int(n_inner) % embed_dim == 0:
        fields["mlp_ratio"] = 4 if n_inner is None else int(n_inner) // embed_dim
    elif "mlp_hidden" in has:
        fields["mlp_hidden"] = int(n_inner)
    else:
        raise HFConversionError(f"GPT-2 config n_inner={n_inner} is not a multiple of n_embd="
                                f"{embed_dim}; our MLP width is mlp_ratio * embed_dim.")
    fields.update(
        vocab_size=int(get("vocab_size")), num_layers=int(get("n_layer")),
        num_heads=int(get("n_head")), embed_dim=embed_dim, max_len=int(get("n_positions")),
        use_bias=True, tie_embeddings=bool(get("tie_word_embeddings", True)),
        activation=ACTIVATIONS_FROM_HF[act])
    if "dropout" not in overrides:
        pdrops = {float(get(k, 0.1)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        if len(pdrops) > 1:
            raise HFConversionError(f"GPT-2 config resid/embd/attn_pdrop differ ({sorted(pdrops)}) "
                                    "but our Decoder has one dropout rate: pass dropout=.")
        fields["dropout"] = pdrops.pop()
    return TransformerConfig(**{**fields, **overrides})


def _check_gpt2_config(cfg: TransformerConfig):
    for f in dataclasses.fields(cfg):
        if f.name in _GPT2_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if getattr(cfg, f.name) != default:
            raise HFConversionError(f"TransformerConfig.{f.name}={getattr(cfg, f.name)!r} has no "
                                    f"GPT-2 equivalent (GPT-2 needs {f.name}={default!r}).")
    if cfg.activation not in ACTIVATIONS_TO_HF:
        raise HFConversionError(f"activation={cfg.activation!r} has no GPT-2 equivalent; "
                                f"expected one of {sorted(ACTIVATIONS_TO_HF)}.")


def config_to_hf(cfg: TransformerConfig, **hf_kwargs):
    """``TransformerConfig`` -> ``transformers.GPT2Config`` (``hf_kwargs`` are passed on, e.g.
    ``bos_token_id``). The default bos/eos token id 50256 is dropped when outside the vocab."""
    from transformers import GPT2Config

    _check_gpt2_config(cfg)
    n_inner = getattr(cfg, "mlp_hidden_dim", cfg.mlp_ratio * cfg.embed_dim)
    kwargs = dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.embed_dim,
        n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_inner=None if n_inner == 4 * cfg.embed_dim else n_inner,
        activation_function=ACTIVATIONS_TO_HF[cfg.activation], resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        layer_norm_epsilon=getattr(cfg, "norm_eps", LAYER_NORM_EPS),
        tie_word_embeddings=cfg.tie_embeddings)
    if cfg.vocab_size <= 50256:
        kwargs.update(bos_token_id=None, eos_token_id=None)
    return GPT2Config(**{**kwargs, **hf_kwargs})


# ------------------------------------------------------------------------------- parameters

def expected_shapes(cfg: TransformerConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our parameter paths -> shapes, from ``jax.eval_shape`` of ``Decoder(cfg).init``."""
    def init():
        boxed = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
        return nn.meta.unbox(boxed)
    flat = traverse_util.flatten_dict(jax.eval_shape(init))
    return {path: tuple(x.shape) for path, x in flat.items()}


def _specs(cfg: TransformerConfig) -> list[tuple[str, str, list[tuple[str, ...]]]]:
    """(Hugging Face name without prefix, kind, our paths) in the checkpoint's order."""
    specs = [("wte.weight", "copy", [("token_embed", "embedding")]),
             ("wpe.weight", "copy", [("pos_embed",)])]
    qkv = ("query", "key", "value")
    for i in range(cfg.num_layers):
        h, o = f"h.{i}.", f"layer_{i}"
        specs += [
            (h + "ln_1.weight", "copy", [(o, "attn_norm", "scale")]),
            (h + "ln_1.bias", "copy", [(o, "attn_norm", "bias")]),
            (h + "attn.c_attn.weight", "qkv", [(o, "attn", n, "kernel") for n in qkv]),
            (h + "attn.c_attn.bias", "qkv", [(o, "attn", n, "bias") for n in qkv]),
            (h + "attn.c_proj.weight", "merge", [(o, "attn", "out", "kernel")]),
            (h + "attn.c_proj.bias", "copy", [(o, "attn", "out", "bias")]),
            (h + "ln_2.weight", "copy", [(o, "mlp_norm", "scale")]),
            (h + "ln_2.bias", "copy", [(o, "mlp_norm", "bias")]),
            (h + "mlp.c_fc.weight", "copy", [(o, "mlp", "fc_in", "kernel")]),
            (h + "mlp.c_fc.bias", "copy", [(o, "mlp", "fc_in", "bias")]),
            (h + "mlp.c_proj.weight", "copy", [(o, "mlp", "fc_out", "kernel")]),
            (h + "mlp.c_proj.bias", "copy", [(o, "mlp", "fc_out", "bias")]),
        ]
    specs += [("ln_f.weight", "copy", [("final_norm", "scale")]),
              ("ln_f.bias", "copy", [("final_norm", "bias")])]
    if not cfg.tie_embeddings:
        specs.append(("lm_head.weight", "transpose", [("lm_head", "kernel")]))
    return specs


def _hf_shape(kind: str, ours: list[tuple[int, ...]]) -> tuple[int, ...]:
    s = ours[0]
    if kind == "copy":
        return s
    if kind == "qkv":  # 3 x [..., H, D] -> [..., 3 H D]
        return (*s[:-2], 3 * s[-2] * s[-1])
    if kind == "merge":  # [H, D, E] -> [H D, E]
        return (s[0] * s[1], s[2])
    if kind == "transpose":
        return s[::-1]
    raise AssertionError(kind)


def _to_ours(kind: str, x: np.ndarray, ours: list[tuple[int, ...]]) -> list[np.ndarray]:
    if kind == "copy":
        return [x]
    if kind == "qkv":
        return [part.reshape(s) for part, s in zip(np.split(x, 3, axis=-1), ours)]
    if kind == "merge":
        return [x.reshape(ours[0])]
    if kind == "transpose":
        return [np.ascontiguousarray(x.T)]
    raise AssertionError(kind)


def _to_hf(kind: str, xs: list[np.ndarray]) -> np.ndarray:
    if kind == "copy":
        return xs[0]
    if kind == "qkv":
        return np.concatenate([x.reshape(*x.shape[:-2], -1) for x in xs], axis=-1)
    if kind == "merge":
        return xs[0].reshape(-1, xs[0].shape[-1])
    if kind == "transpose":
        return np.ascontiguousarray(xs[0].T)
    raise AssertionError(kind)


def _numpy_f32(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (numpy has no bfloat16: go through float32)
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _plan(cfg: TransformerConfig):
    """-> [(hf name, kind, our paths or None for a bias our model lacks, hf shape)]."""
    shapes = expected_shapes(cfg)
    plan, prev_shape = [], None
    for name, kind, paths in _specs(cfg):
        if all(p in shapes for p in paths):
            hf_shape = _hf_shape(kind, [shapes[p] for p in paths])
            plan.append((name, kind, paths, hf_shape))
        elif not cfg.use_bias and name.endswith(".bias"):  # follows its weight: [..., N] -> [N]
            plan.append((name, kind, None, (prev_shape[-1],)))
        else:
            raise AssertionError(f"{paths} not among Decoder's parameters")
        prev_shape = plan[-1][3]
    return plan, shapes


def params_from_hf_state_dict(state_dict: Mapping[str, Any], cfg: TransformerConfig) -> dict:
    """A GPT-2 state dict (torch tensors or arrays) -> our params (nested dict of float32 numpy
    arrays, the tree of ``Decoder(cfg).init(...)['params']`` unboxed).

    Raises ``HFConversionError`` naming the first tensor (in checkpoint order) that is missing or
    has the wrong shape, or listing keys the config has no place for.
    """
    _check_gpt2_config(cfg)
    sd, keys = {}, {}  # keys: our name -> the key as given
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        name = key.removeprefix(_PREFIX)
        sd[name], keys[name] = value, key
    tied_head = sd.pop("lm_head.weight", None) if cfg.tie_embeddings else None
    plan, shapes = _plan(cfg)
    flat = {}
    for name, kind, paths, hf_shape in plan:
        if name not in sd:
            raise HFConversionError(f"GPT-2 state dict has no tensor {name!r} (expected shape "
                                    f"{hf_shape}) for {cfg}.")
        got = tuple(sd[name].shape)
        if got != hf_shape:
            raise HFConversionError(f"GPT-2 tensor {keys[name]!r} has shape {got}, expected "
                                    f"{hf_shape} for {cfg}.")
        x = _numpy_f32(sd.pop(name))
        if paths is None:
            if np.any(x != 0):
                raise HFConversionError(f"GPT-2 tensor {name!r} is non-zero but the config has "
                                        "use_bias=False.")
            continue
        for path, y in zip(paths, _to_ours(kind, x, [shapes[p] for p in paths])):
            flat[path] = y
    if sd:
        extra = sorted(keys[k] for k in sd)
        raise HFConversionError(f"GPT-2 state dict has tensors with no place in {cfg}: "
                                f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if tied_head is not None:
        wte = flat[("token_embed", "embedding")]
        if tuple(tied_head.shape) != wte.shape or not np.array_equal(_numpy_f32(tied_head), wte):
            raise HFConversionError("GPT-2 tensor 'lm_head.weight' differs from 'wte.weight' but "
                                    "the config ties them (tie_word_embeddings / tie_embeddings).")
    if {p: y.shape for p, y in flat.items()} != shapes:  # the mapping itself is wrong
        raise AssertionError("converted parameters do not match Decoder's init")
    return traverse_util.unflatten_dict(flat)


def flat_params_checked(params, shapes: dict, cfg, error=None) -> dict:
    """Our params flattened to ``{path: array}``, checked against the expected ``shapes`` of
    ``cfg``; ``error`` (default ``HFConversionError``) names the first mismatched parameter."""
    error = error or HFConversionError
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    for path, shape in shapes.items():
        got = tuple(np.shape(flat[path])) if path in flat else None
        if got != shape:
            raise error(f"parameter {'/'.join(path)} has shape {got}, expected {shape} for {cfg}.")
    extra = sorted("/".join(p) for p in set(flat) - set(shapes))
    if extra:
        raise error(f"parameters with no place in {cfg}: {extra[:8]}")
    return flat


def params_to_hf_state_dict(params, cfg: TransformerConfig) -> dict[str, np.ndarray]:
    """Our params -> the state dict of ``transformers.GPT2LMHeadModel`` (float32 numpy arrays;
    keys as in its ``state_dict()``, ``lm_head.weight`` included even when tied)."""
    _check_gpt2_config(cfg)
    plan, shapes = _plan(cfg)
    flat = flat_params_checked(params, shapes, cfg, HFConversionError)
    out = {}
    for name, kind, paths, hf_shape in plan:
        if paths is None:
            x = np.zeros(hf_shape, np.float32)
        else:
            x = _to_hf(kind, [_numpy_f32(flat[p]) for p in paths])
        out[name if name.startswith("lm_head.") else _PREFIX + name] = np.ascontiguousarray(x)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out[_PREFIX + "wte.weight"]
    return out


# --------------------------------------------------------------------------------- folders

def load_hf(name_or_path: str | os.PathLike, *, hf_kwargs: Mapping[str, Any] | None = None,
            **overrides) -> tuple[TransformerConfig, dict]:
    """A hub name (e.g. 'gpt2') or a folder written by ``save_pretrained`` -> (cfg, params).

    ``hf_kwargs`` go to ``from_pretrained`` (e.g. ``revision``, ``cache_dir``); ``overrides`` to
    ``config_from_hf``.
    """
    from transformers import AutoConfig, GPT2LMHeadModel

    hf_kwargs = dict(hf_kwargs or {})
    hf_config = AutoConfig.from_pretrained(str(name_or_path), **hf_kwargs)
    cfg = config_from_hf(hf_config, **overrides)  # rejects non-GPT-2 before loading weights
    model = GPT2LMHeadModel.from_pretrained(str(name_or_path), config=hf_config, **hf_kwargs)
    params = params_from_hf_state_dict(model.state_dict(), cfg)
    return cfg, params


def save_hf(params, cfg: TransformerConfig, directory: str | os.PathLike, **hf_config_kwargs):
    """Write ``directory`` (config.json + model.safetensors) loadable by
    ``transformers.GPT2LMHeadModel.from_pretrained``. ``hf_config_kwargs`` go to ``GPT2Config``
    (e.g. ``bos_token_id``, ``eos_token_id``)."""
    import torch
    from transformers import GPT2LMHeadModel

    state = params_to_hf_state_dict(params, cfg)
    model = GPT2LMHeadModel(config_to_hf(cfg, **hf_config_kwargs))
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    model.save_pretrained(str(directory))
    return directory
