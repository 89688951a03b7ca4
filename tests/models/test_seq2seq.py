"""Tests of research.models.seq2seq.EncoderDecoder.

Reference: PyTorch's ``torch.nn.Transformer`` (the original architecture: post-norm, ReLU FFN;
``norm_first=True`` for the pre-norm option), with our weights copied in and the paper's embedding
(``x * sqrt(d_model)`` plus the sinusoidal table, written here from the paper's formula in torch)
and tied output projection applied around it; fp32, tiny sizes, a padded source.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from research.core.config import ConfigError
from research.models.seq2seq import EncoderDecoder
from research.models.transformer import TransformerConfig, init_caches

E, H, L, V, FF = 16, 2, 2, 11, 32


def make_cfg(norm_position="post", **kw):
    return TransformerConfig(vocab_size=V, num_layers=L, num_heads=H, embed_dim=E, max_len=12,
                             mlp_ratio=FF // E, activation="relu", norm_position=norm_position,
                             **kw)


def random_params(cfg, seed=0, std=0.3):
    """All parameters random (biases and norm offsets too), so that a mapping mistake shows."""
    model = EncoderDecoder(cfg)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32),
                                     jnp.zeros((1, 2), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(0.0, std, leaf.shape).astype(np.float32)
        return jnp.asarray(x + jax.tree_util.keystr(path).endswith("['scale']"))
    return jax.tree_util.tree_map_with_path(draw, shapes)


SRC = np.array([[3, 4, 5, 6, 7, 0, 0], [8, 9, 10, 3, 4, 5, 6]], np.int32)  # row 0 padded
TGT = np.array([[1, 3, 4, 5, 9], [1, 6, 7, 8, 10]], np.int32)


def _t(x):
    return torch.from_numpy(np.array(x, np.float32))


def load_attention(mha, p):
    """Our query/key/value kernels [E, H, D] + biases [H, D] and out [H, D, E] -> torch's
    in_proj_weight [3E, E] (rows: q|k|v, head-major) and out_proj."""
    w = [np.asarray(p[n]["kernel"]).reshape(E, E).T for n in ("query", "key", "value")]
    b = [np.asarray(p[n]["bias"]).reshape(E) for n in ("query", "key", "value")]
    mha.in_proj_weight.copy_(_t(np.concatenate(w, 0)))
    mha.in_proj_bias.copy_(_t(np.concatenate(b, 0)))
    mha.out_proj.weight.copy_(_t(np.asarray(p["out"]["kernel"]).reshape(E, E).T))
    mha.out_proj.bias.copy_(_t(p["out"]["bias"]))


def load_norm(ln, p):
    ln.weight.copy_(_t(p["scale"]))
    ln.bias.copy_(_t(p["bias"]))


def load_mlp(layer, p):
    layer.linear1.weight.copy_(_t(np.asarray(p["fc_in"]["kernel"]).T))
    layer.linear1.bias.copy_(_t(p["fc_in"]["bias"]))
    layer.linear2.weight.copy_(_t(np.asarray(p["fc_out"]["kernel"]).T))
    layer.linear2.bias.copy_(_t(p["fc_out"]["bias"]))


def torch_reference(params, cfg):
    pre = cfg.norm_position == "pre"
    ref = torch.nn.Transformer(d_model=E, nhead=H, num_encoder_layers=L, num_decoder_layers=L,
                               dim_feedforward=FF, dropout=0.0, activation="relu",
                               batch_first=True, norm_first=pre).eval()
    with torch.no_grad():
        for i, layer in enumerate(ref.encoder.layers):
            p = params[f"encoder_{i}"]
            load_attention(layer.self_attn, p["attn"])
            load_norm(layer.norm1, p["attn_norm"])
            load_norm(layer.norm2, p["mlp_norm"])
            load_mlp(layer, p["mlp"])
        for i, layer in enumerate(ref.decoder.layers):
            p = params[f"decoder_{i}"]
            load_attention(layer.self_attn, p["attn"])
            load_attention(layer.multihead_attn, p["cross_attn"])
            load_norm(layer.norm1, p["attn_norm"])
            load_norm(layer.norm2, p["cross_norm"])
            load_norm(layer.norm3, p["mlp_norm"])
            load_mlp(layer, p["mlp"])
        if pre:
            load_norm(ref.encoder.norm, params["encoder_norm"])
            load_norm(ref.decoder.norm, params["decoder_norm"])
        else:  # the paper's post-norm stacks end with their last sub-layer's norm, no extra one
            ref.encoder.norm = None
            ref.decoder.norm = None
    return ref


def paper_positions(length, d):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pe = torch.zeros(length, d, dtype=torch.float64)
    for pos in range(length):
        for i in range(0, d, 2):
            pe[pos, i] = math.sin(pos / 10000 ** (i / d))
            pe[pos, i + 1] = math.cos(pos / 10000 ** (i / d))
    return pe.float()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's nested-tensor fast-path notes
@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_matches_torch_nn_transformer(norm_position):
    cfg = make_cfg(norm_position)
    params = random_params(cfg)
    ours = np.asarray(EncoderDecoder(cfg).apply({"params": params}, SRC, TGT))
    enc_ours, mask = EncoderDecoder(cfg).apply({"params": params}, SRC, method="encode")

    ref = torch_reference(params, cfg)
    emb = _t(params["token_embed"]["embedding"])
    pe = paper_positions(cfg.max_len, E)
    src, tgt = torch.from_numpy(SRC).long(), torch.from_numpy(TGT).long()
    pad = src == 0
    with torch.no_grad():
        x = emb[src] * math.sqrt(E) + pe[: src.shape[1]]
        y = emb[tgt] * math.sqrt(E) + pe[: tgt.shape[1]]
        memory = ref.encoder(x, src_key_padding_mask=pad)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        out = ref.decoder(y, memory, tgt_mask=causal, tgt_is_causal=True,
                          memory_key_padding_mask=pad)
        logits = out @ emb.T
    real = ~pad.numpy()
    np.testing.assert_array_equal(np.asarray(mask), real)
    np.testing.assert_allclose(np.asarray(enc_ours)[real], memory.numpy()[real], atol=1e-4,
                               rtol=1e-4)
    np.testing.assert_allclose(ours, logits.numpy(), atol=1e-4, rtol=1e-4)
    assert np.abs(ours).max() > 1.0  # not a degenerate near-zero output


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_cached_decoding_equals_teacher_forcing(norm_position):
    cfg = make_cfg(norm_position)
    model, params = EncoderDecoder(cfg), random_params(cfg, seed=1)
    full = np.asarray(model.apply({"params": params}, SRC, TGT))
    enc_out, src_mask = model.apply({"params": params}, SRC, method="encode")
    caches = init_caches(cfg, SRC.shape[0], TGT.shape[1])
    steps = []
    decode = jax.jit(lambda t, c, i: model.apply({"params": params}, t, enc_out, src_mask, c, i,
                                                 method="decode"))
    for i in range(TGT.shape[1]):  # one token at a time
        logits, caches = decode(TGT[:, i:i + 1], caches, i)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5, rtol=1e-5)
    # A prefill of 3 tokens, then 2 more at once.
    caches = init_caches(cfg, SRC.shape[0], TGT.shape[1])
    a, caches = decode(TGT[:, :3], caches, 0)
    b, _ = decode(TGT[:, 3:], caches, 3)
    np.testing.assert_allclose(np.concatenate([a, b], 1), full, atol=1e-5, rtol=1e-5)


def test_source_padding_is_ignored():
    cfg = make_cfg()
    model, params = EncoderDecoder(cfg), random_params(cfg, seed=2)
    padded = np.concatenate([SRC, np.zeros((2, 3), np.int32)], axis=1)
    np.testing.assert_allclose(model.apply({"params": params}, padded, TGT),
                               model.apply({"params": params}, SRC, TGT), atol=1e-5, rtol=1e-5)


def test_longer_than_max_len_raises():
    cfg = make_cfg()
    model, params = EncoderDecoder(cfg), random_params(cfg)
    with pytest.raises(ValueError, match="Source length 13 exceeds .*max_len=12"):
        model.apply({"params": params}, np.ones((1, 13), np.int32), TGT)
    with pytest.raises(ValueError, match="Target length 13 exceeds .*max_len=12"):
        model.apply({"params": params}, SRC, np.ones((2, 13), np.int32))


def test_config_errors_name_the_key():
    for kw, key in ((dict(positions="rope"), "positions"), (dict(tie_embeddings=False),
                                                             "tie_embeddings")):
        with pytest.raises(ConfigError, match=key):
            EncoderDecoder(make_cfg(**kw)).init(jax.random.key(0), SRC, TGT)
