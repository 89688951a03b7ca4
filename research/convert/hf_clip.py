"""Import Hugging Face ``CLIPModel`` weights (vision and text towers) into ``ClipModel`` params.

Our architecture expresses HF's CLIP exactly with these options:
- vision: ``research.models.vit.ViT`` with ``pool='cls'``, ``patch_bias=False`` (HF's patch
  convolution has no bias), ``embed_norm=True`` (HF's ``pre_layrnorm``), pre-LN blocks,
  ``activation='quick_gelu'`` (``hidden_act``), and the final norm = HF's ``post_layernorm``
  applied to the class token (a LayerNorm acts per token, so normalising all tokens then taking
  the class token is the same);
- text: ``TextEncoder`` with ``causal=True``, learned positions (``max_len`` =
  ``max_position_embeddings``), pre-LN blocks, ``final_layer_norm``, pooled at the first
  ``eos_token_id`` (HF's rule when ``eos_token_id != 2``; with the legacy id 2 HF pools at the
  argmax token id instead, which is the same position for CLIP's tokenizer, where EOS is the
  largest id), padding keys masked by ``pad_token_id``;
- ``visual_projection`` / ``text_projection`` (no bias) -> ``image_proj`` / ``text_proj``;
  ``logit_scale`` -> ``log_scale`` (HF does not clamp it in the forward pass; ours clamps at 100,
  equal below that).

``load_hf_clip(model_or_path)`` -> ``(ClipModel, params)``; ``model.apply({'params': p},
pixels_nhwc, input_ids)`` gives the normalised embeddings and the scale, so
``scale * img @ txt.T`` equals HF's ``logits_per_image``. Pixels are HF's (already normalised)
``pixel_values`` transposed from NCHW to NHWC.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from research.models import vit as vit_lib
from research.models.clip import ClipModel
from research.models.transformer import TransformerConfig


def _act(name: str) -> str:
    table = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
             "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
    if name not in table:
        raise ValueError(f"HF CLIP hidden_act={name!r} has no counterpart here; known: "
                         f"{sorted(table)}")
    return table[name]


def configs_from_hf(hf_config) -> tuple[TransformerConfig, vit_lib.VitConfig, TransformerConfig,
                                         dict]:
    v, t = hf_config.vision_config, hf_config.text_config
    vit = vit_lib.VitConfig(image_size=v.image_size, patch_size=v.patch_size,
                            channels=v.num_channels, num_classes=None, pool="cls",
                            patch_bias=False, embed_norm=True)
    vcfg = TransformerConfig(vocab_size=1, max_len=vit.num_tokens, num_layers=v.num_hidden_layers,
                             num_heads=v.num_attention_heads, embed_dim=v.hidden_size,
                             mlp_hidden=v.intermediate_size, activation=_act(v.hidden_act),
                             norm_eps=v.layer_norm_eps)
    tcfg = TransformerConfig(vocab_size=t.vocab_size, max_len=t.max_position_embeddings,
                             num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                             embed_dim=t.hidden_size, mlp_hidden=t.intermediate_size,
                             activation=_act(t.hidden_act), norm_eps=t.layer_norm_eps)
    extra = {"embed_dim": hf_config.projection_dim, "eos_id": t.eos_token_id,
             "pad_id": t.pad_token_id if t.pad_token_id is not None else -1}
    return vcfg, vit, tcfg, extra


def _ln(sd, prefix):
    return {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}


def _layer(sd, prefix: str, heads: int) -> dict:
    def proj(name):
        w, b = sd[f"{prefix}.self_attn.{name}.weight"], sd[f"{prefix}.self_attn.{name}.bias"]
        e = w.shape[1]
        return {"kernel": w.T.reshape(e, heads, -1), "bias": b.reshape(heads, -1)}
    out_w = sd[f"{prefix}.self_attn.out_proj.weight"]
    e = out_w.shape[0]
    return {
        "attn_norm": _ln(sd, f"{prefix}.layer_norm1"),
        "attn": {"query": proj("q_proj"), "key": proj("k_proj"), "value": proj("v_proj"),
                 "out": {"kernel": out_w.T.reshape(heads, -1, e),
                         "bias": sd[f"{prefix}.self_attn.out_proj.bias"]}},
        "mlp_norm": _ln(sd, f"{prefix}.layer_norm2"),
        "mlp": {"fc_in": {"kernel": sd[f"{prefix}.mlp.fc1.weight"].T,
                          "bias": sd[f"{prefix}.mlp.fc1.bias"]},
                "fc_out": {"kernel": sd[f"{prefix}.mlp.fc2.weight"].T,
                           "bias": sd[f"{prefix}.mlp.fc2.bias"]}},
    }


def params_from_state_dict(sd: dict[str, np.ndarray], hf_config) -> dict[str, Any]:
    """HF ``CLIPModel.state_dict()`` (numpy float32) -> ``ClipModel`` params."""
    v, t = hf_config.vision_config, hf_config.text_config
    vp, tp = "vision_model", "text_model"
    patch = sd[f"{vp}.embeddings.patch_embedding.weight"]            # [E, C, p, p]
    image = {
        "patch_embed": {"kernel": patch.transpose(2, 3, 1, 0)},      # [p, p, C, E]
        "cls_token": sd[f"{vp}.embeddings.class_embedding"],
        "pos_embed": sd[f"{vp}.embeddings.position_embedding.weight"],
        "embed_norm": _ln(sd, f"{vp}.pre_layrnorm"),
        "final_norm": _ln(sd, f"{vp}.post_layernorm"),
        **{f"layer_{i}": _layer(sd, f"{vp}.encoder.layers.{i}", v.num_attention_heads)
           for i in range(v.num_hidden_layers)},
    }
    text = {
        "token_embed": {"embedding": sd[f"{tp}.embeddings.token_embedding.weight"]},
        "pos_embed": sd[f"{tp}.embeddings.position_embedding.weight"],
        "final_norm": _ln(sd, f"{tp}.final_layer_norm"),
        **{f"layer_{i}": _layer(sd, f"{tp}.encoder.layers.{i}", t.num_attention_heads)
           for i in range(t.num_hidden_layers)},
    }
    return {
        "image_encoder": image,
        "text_encoder": text,
        "image_proj": {"kernel": sd["visual_projection.weight"].T},
        "text_proj": {"kernel": sd["text_projection.weight"].T},
        "log_scale": np.asarray(sd["logit_scale"], np.float32).reshape(()),
    }


def load_hf_clip(model_or_path: Any) -> tuple[ClipModel, dict[str, Any]]:
    """A ``transformers.CLIPModel`` (or a name/folder ``CLIPModel.from_pretrained`` loads) ->
    ``(ClipModel, params)`` with the same outputs."""
    import jax
    import jax.numpy as jnp

    if isinstance(model_or_path, str):
        from transformers import CLIPModel
        model_or_path = CLIPModel.from_pretrained(model_or_path)
    hf = model_or_path
    vcfg, vit, tcfg, extra = configs_from_hf(hf.config)
    sd = {k: v.detach().float().cpu().numpy() for k, v in hf.state_dict().items()}
    params = params_from_state_dict(sd, hf.config)
    model = ClipModel(vit_lib.ViT(vcfg, vit), tcfg, embed_dim=extra["embed_dim"], loss="infonce",
                      text_causal=True, eos_id=extra["eos_id"], pad_id=extra["pad_id"])
    # Check the layout against the module's own parameter shapes (a clear error, not XLA's).
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, *vit.input_shape)),
        jnp.zeros((1, tcfg.max_len), jnp.int32)))["params"]
    import flax.linen as nn
    shapes = nn.meta.unbox(shapes)
    want = jax.tree_util.tree_flatten_with_path(shapes)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    got = {jax.tree_util.keystr(k): v for k, v in got.items()}
    for path, s in want:
        key = jax.tree_util.keystr(path)
        if key not in got or tuple(np.shape(got[key])) != tuple(s.shape):
            raise ValueError(f"HF CLIP import: parameter {key} expected shape {tuple(s.shape)}, "
                             f"got {np.shape(got[key]) if key in got else 'nothing'}")
    if len(got) != len(want):
        raise ValueError(f"HF CLIP import: {len(got)} tensors mapped, the model has {len(want)}")
    return model, jax.tree.map(jnp.asarray, params)
