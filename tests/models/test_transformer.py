import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models.transformer import Decoder, TransformerConfig, count_params, init_caches


def tiny(**kw):
    cfg = TransformerConfig(**{**dict(vocab_size=17, num_layers=2, num_heads=2, embed_dim=16,
                                      max_len=12, use_bias=True), **kw})
    model = Decoder(cfg)
    params = jax.tree.map(lambda x: x, model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"])
    import flax.linen as nn
    return cfg, model, nn.meta.unbox(params)


def test_changing_a_future_token_never_changes_past_logits():
    _, model, params = tiny()
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 17)
    base = model.apply({"params": params}, tokens)
    for t in (3, 7, 11):
        changed = tokens.at[:, t].set((tokens[:, t] + 5) % 17)
        out = model.apply({"params": params}, changed)
        np.testing.assert_array_equal(np.asarray(base[:, :t]), np.asarray(out[:, :t]))
        assert not np.allclose(base[:, t], out[:, t])


def test_parameter_count_matches_nanogpt_formula():
    # nanoGPT without biases: wte V*E + wpe T*E + L*(12 E^2 + 2E (two LN weights)) + final LN E.
    cfg, _, params = tiny(use_bias=False, vocab_size=65, num_layers=4, num_heads=4, embed_dim=128,
                          max_len=64)
    V, E, L, T = 65, 128, 4, 64
    assert count_params(params) == V * E + T * E + L * (12 * E * E + 2 * E) + E


def test_dropout_only_in_training_and_deterministic_by_rng():
    _, model, params = tiny(dropout=0.5)
    tokens = jnp.arange(12)[None] % 17
    eval_a = model.apply({"params": params}, tokens)
    eval_b = model.apply({"params": params}, tokens, deterministic=True)
    np.testing.assert_array_equal(eval_a, eval_b)
    tr = lambda s: model.apply({"params": params}, tokens, deterministic=False,  # noqa: E731
                               rngs={"dropout": jax.random.key(s)})
    np.testing.assert_array_equal(tr(1), tr(1))
    assert not np.allclose(tr(1), tr(2))


def test_bf16_compute_keeps_fp32_params_and_close_logits():
    cfg, model, params = tiny()
    tokens = jnp.arange(12)[None] % 17
    ref = model.apply({"params": params}, tokens)
    bf = Decoder(TransformerConfig(**{**cfg.__dict__, "dtype": "bfloat16"}))
    out = bf.apply({"params": params}, tokens)
    assert out.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    np.testing.assert_allclose(out, ref, atol=0.1)


def test_remat_gives_identical_gradients():
    cfg, model, params = tiny()
    tokens = jnp.arange(24).reshape(2, 12) % 17
    loss = lambda m: lambda p: m.apply({"params": p}, tokens).mean()  # noqa: E731
    g1 = jax.grad(loss(model))(params)
    g2 = jax.grad(loss(Decoder(TransformerConfig(**{**cfg.__dict__, "remat": "nothing_saveable"}))))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g1, g2)


def test_too_long_input_and_bad_config_values_are_named():
    _, model, params = tiny()
    with pytest.raises(ValueError, match="max_len"):
        model.apply({"params": params}, jnp.zeros((1, 13), jnp.int32))
    with pytest.raises(ValueError, match="config.model.embed_dim"):
        TransformerConfig(vocab_size=5, num_heads=3, embed_dim=16)
    with pytest.raises(ValueError, match="config.model.dropout"):
        TransformerConfig(vocab_size=5, dropout=1.5)


def test_kv_cache_prefill_and_steps_equal_full_forward():
    cfg, model, params = tiny()
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 17)
    full = model.apply({"params": params}, tokens)
    caches = init_caches(cfg, 2)
    logits, caches = model.apply({"params": params}, tokens[:, :5], caches, jnp.int32(0), method="decode")
    outs = [logits]
    for t in range(5, 12):
        logits, caches = model.apply({"params": params}, tokens[:, t:t + 1], caches, jnp.int32(t),
                                     method="decode")
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
