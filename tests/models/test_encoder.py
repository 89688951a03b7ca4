"""The BERT-style encoder (research/models/encoder.py): padding invariance, bidirectionality, the
length check, logical axis names, pad_id-derived padding, remat and the untied / pre-norm options.
(Logits against transformers' BertForMaskedLM are in tests/convert/test_hf_bert.py.)"""
import functools
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from research.models.encoder import Encoder, EncoderConfig, check_dense, configs_from_dict
from research.models.transformer import TransformerConfig

V, T, PAD = 23, 12, 0


@functools.lru_cache(maxsize=None)
def _tiny(items):
    return _make_tiny(**dict(items))


def tiny(**kw):
    """(model, boxed init params, perturbed params) of a 2-layer encoder; cached per settings."""
    return _tiny(tuple(sorted(kw.items())))


def _make_tiny(**kw):
    enc_kw = {k: kw.pop(k) for k in ("type_vocab_size", "pad_id") if k in kw}
    cfg = TransformerConfig(**{**dict(vocab_size=V, num_layers=2, num_heads=2, embed_dim=16,
                                      max_len=T, norm_position="post", norm_eps=1e-12), **kw})
    enc = EncoderConfig(**{**dict(type_vocab_size=2, pad_id=PAD), **enc_kw})
    model = Encoder(cfg, enc)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    # Larger weights than the 0.02 init, so that every dependency shows in the outputs.
    leaves, tree = jax.tree.flatten(nn.meta.unbox(boxed))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    return model, boxed, params


def batch(seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (3, T))
    types = rng.integers(0, 2, (3, T))
    padding = np.ones((3, T), bool)
    padding[1, 7:] = False
    padding[2, 3:] = False
    tokens[~padding] = PAD
    return jnp.asarray(tokens), jnp.asarray(types), jnp.asarray(padding)


def test_outputs_at_real_positions_ignore_pad_tokens():
    model, _, params = tiny()
    apply = jax.jit(lambda *a: model.apply({"params": params}, *a))
    tokens, types, padding = batch()
    base = apply(tokens, types, padding)
    rng = np.random.default_rng(2)
    other = jnp.where(padding, tokens, jnp.asarray(rng.integers(1, V, tokens.shape)))
    other_types = jnp.where(padding, types, 1 - types)
    out = apply(other, other_types, padding)
    real = np.asarray(padding)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(base)[real], atol=1e-6, rtol=0)
    # Without the mask the same change does reach the real positions: the check means something.
    unmasked = lambda t, ty: np.asarray(apply(t, ty, jnp.ones_like(padding)))  # noqa: E731
    assert np.abs(unmasked(other, other_types)[real] - unmasked(tokens, types)[real]).max() > 1e-3


def test_padding_defaults_to_tokens_not_pad_id():
    model, _, params = tiny()
    tokens, types, padding = batch()
    explicit = model.apply({"params": params}, tokens, types, padding)
    implicit = model.apply({"params": params}, tokens, types)
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(implicit))


def test_attention_is_bidirectional_and_token_types_matter():
    model, _, params = tiny()
    tokens, types, _ = batch()
    base = np.asarray(model.apply({"params": params}, tokens, types))
    later = tokens.at[0, T - 1].set(tokens[0, T - 1] % (V - 1) + 1)  # another non-pad token
    assert np.abs(np.asarray(model.apply({"params": params}, later, types))[0, 0]
                  - base[0, 0]).max() > 1e-4  # position 0 sees the last position
    flipped = np.asarray(model.apply({"params": params}, tokens, 1 - types))
    assert np.abs(flipped - base).max() > 1e-4


def test_too_long_sequence_is_an_error_not_truncation():
    model, _, params = tiny()
    with pytest.raises(ValueError, match=r"Sequence length 13 exceeds .*max_len=12"):
        model.apply({"params": params}, jnp.ones((1, T + 1), jnp.int32))


def test_every_parameter_has_logical_axis_names():
    _, boxed, params = tiny(tie_embeddings=False)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    specs = nn.get_partition_spec(boxed)
    assert specs["token_embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert specs["mlm_bias"] == jax.sharding.PartitionSpec("vocab")
    assert params["type_embed"].shape == (2, 16) and params["mlm_bias"].shape == (V,)
    assert params["mlm_decoder"]["kernel"].shape == (16, V)


def test_pre_norm_variant_adds_a_final_norm_and_remat_keeps_gradients():
    model, _, params = tiny(norm_position="pre")
    assert "final_norm" in params
    tokens, types, padding = batch()

    def loss(m):
        return lambda p: m.apply({"params": p}, tokens, types, padding).sum()
    remat_model, _, _ = tiny(norm_position="pre", remat="nothing_saveable")
    g = jax.jit(jax.grad(loss(model)))(params)
    g_remat = jax.jit(jax.grad(loss(remat_model)))(params)
    # Remat recomputes the forward inside the backward, so float32 sums may round differently:
    # agree to 1e-6 of the largest gradient (~60 with these weights; some, like the key biases',
    # are exactly 0 in theory and float noise here).
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g))
    assert scale > 1.0
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_dropout_only_in_training():
    model, _, params = tiny(dropout=0.5)
    tokens, types, padding = batch()
    a = model.apply({"params": params}, tokens, types, padding)
    b = model.apply({"params": params}, tokens, types, padding, deterministic=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tr = jax.jit(lambda s: model.apply({"params": params}, tokens, types, padding,
                                       deterministic=False, rngs={"dropout": jax.random.key(s)}))
    np.testing.assert_array_equal(np.asarray(tr(1)), np.asarray(tr(1)))
    assert not np.allclose(tr(1), tr(2))


def test_configs_from_dict_splits_and_rejects_unknown_keys():
    cfg, enc = configs_from_dict(dict(num_layers=1, type_vocab_size=3), vocab_size=9, pad_id=8)
    assert (cfg.num_layers, cfg.vocab_size, enc.type_vocab_size, enc.pad_id) == (1, 9, 3, 8)
    with pytest.raises(ConfigError, match="type_vocab_sise"):
        configs_from_dict(dict(type_vocab_sise=2), vocab_size=9)
    with pytest.raises(ConfigError, match="type_vocab_size=0"):
        configs_from_dict(dict(type_vocab_size=0), vocab_size=9)
    with pytest.raises(ConfigError, match="pad_id=9 is outside"):
        configs_from_dict({}, vocab_size=9, pad_id=9)
    # Decoder-only options (mixture-of-experts MLPs) are refused, not silently ignored.
    with pytest.raises(ConfigError, match="moe_experts=4: the BERT encoder has dense MLPs only"):
        check_dense(SimpleNamespace(moe_experts=4), "the BERT encoder")
