"""LLaMA-style configurations of the one ``Decoder``: RMSNorm, SwiGLU, RoPE, ALiBi, grouped-query
attention. Parity with Hugging Face's ``LlamaForCausalLM`` (random weights, CPU, fp32), the KV
cache path, causality, ALiBi beyond the training length, and config validation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import torch  # the [dev] extra pins a CPU torch; transformers is a test dependency here

from research.convert.hf_llama import config_from_hf_llama, from_hf_llama_state_dict
from research.core.config import ConfigError
from research.models.transformer import Decoder, TransformerConfig, count_params, init_caches
from research.nn.attention import alibi_slopes

LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", use_bias=False, tie_embeddings=False)


def make(**kw):
    cfg = TransformerConfig(**{**dict(vocab_size=17, num_layers=2, num_heads=4, embed_dim=32,
                                      max_len=16), **kw})
    model = Decoder(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    # Non-trivial norm scales and larger weights, so that mistakes cannot hide in tiny logits.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 3.0 + (0.2 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
                                   if "scale" in jax.tree_util.keystr(path) else 0.0), params)
    return cfg, model, params


def jitted(model):
    """(forward(params, tokens), decode(params, tokens, caches, index)), each compiled once per shape."""
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    decode = jax.jit(lambda p, t, c, i: model.apply({"params": p}, t, c, i, method="decode"))
    return forward, decode


def decode_all(decode, params, tokens, caches, n_prefill):
    """Logits of a prefill of n_prefill tokens, then one single-token step per position."""
    logits, caches = decode(params, tokens[:, :n_prefill], caches, jnp.int32(0))
    outs = [logits]
    for t in range(n_prefill, tokens.shape[1]):
        logits, caches = decode(params, tokens[:, t:t + 1], caches, jnp.int32(t))
        outs.append(logits)
    return np.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------- HF parity

def test_logits_match_hugging_face_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=61, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=96, rope_theta=5e5,
                         rms_norm_eps=1e-6, max_position_embeddings=32, tie_word_embeddings=False,
                         attn_implementation="eager")
    ref = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, and non-trivial norm weights
        for name, p in ref.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    cfg = config_from_hf_llama(ref.config)
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.mlp_hidden) == (2, 5e5, 1e-6, 96)
    params = from_hf_llama_state_dict(ref.state_dict(), cfg)

    model = Decoder(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    assert jax.tree.map(lambda x: x.shape, shapes["params"]) == jax.tree.map(lambda x: x.shape, params)
    assert params["layer_0"]["attn"]["key"]["kernel"].shape == (64, 2, 16)

    tokens = np.random.default_rng(0).integers(0, 61, (2, 24))
    with torch.no_grad():
        expected = ref(torch.tensor(tokens)).logits.numpy()
    forward, decode = jitted(model)
    logits = np.asarray(forward(params, jnp.asarray(tokens)))
    assert np.abs(expected).max() > 1.0  # far from uniform: the comparison means something
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    # The cached decode path of the imported model agrees with HF too (prefill 10, then steps).
    steps = decode_all(decode, params, jnp.asarray(tokens), init_caches(cfg, 2, 24), 10)
    np.testing.assert_allclose(steps, expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- structure

def test_llama_parameters_names_and_count():
    cfg = TransformerConfig(vocab_size=17, num_layers=2, num_heads=4, embed_dim=32, max_len=16,
                            num_kv_heads=2, mlp_hidden=48, **LLAMA)
    params = nn.meta.unbox(jax.eval_shape(Decoder(cfg).init, jax.random.key(0),
                                          jnp.zeros((1, 4), jnp.int32))["params"])
    V, E, L, K, D, M = 17, 32, 2, 2, 8, 48
    layer = params["layer_0"]
    assert set(params) == {"token_embed", "final_norm", "lm_head", "layer_0", "layer_1"}  # no pos_embed
    assert set(layer["mlp"]) == {"gate", "up", "down"} and set(layer["attn_norm"]) == {"scale"}
    assert layer["attn"]["query"]["kernel"].shape == (E, 4, D)
    assert layer["attn"]["key"]["kernel"].shape == layer["attn"]["value"]["kernel"].shape == (E, K, D)
    per_layer = 2 * E * E + 2 * E * K * D + 3 * E * M + 2 * E
    assert count_params(params) == 2 * V * E + L * per_layer + E
    caches = init_caches(cfg, 3)
    assert caches["layer_1"]["k"].shape == (3, cfg.max_len, K, D)


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0 ** (-2 * i) for i in range(1, 5)])
    # Non power of two: the 4-head slopes, then every other slope of the 8-head sequence.
    np.testing.assert_allclose(alibi_slopes(6), alibi_slopes(4) + alibi_slopes(8)[0::2][:2])


# ----------------------------------------------------------------------------- KV cache, causality

@pytest.mark.parametrize("kw", [
    dict(LLAMA, num_kv_heads=2),                                      # RoPE + GQA
    dict(positions="alibi", num_kv_heads=1, norm="rmsnorm"),          # ALiBi + MQA
    dict(positions="alibi", num_kv_heads=2),                          # ALiBi + GQA, GPT otherwise
], ids=["rope_gqa", "alibi_mqa", "alibi_gqa"])
def test_kv_cache_decode_equals_full_forward_and_causal(kw):
    cfg, model, params = make(**kw)
    forward, decode = jitted(model)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 17)
    base = forward(params, tokens)
    got = decode_all(decode, params, tokens, init_caches(cfg, 2), 5)
    np.testing.assert_allclose(got, base, atol=1e-5, rtol=1e-5)
    # Changing a future token never changes past logits.
    for t in (3, 9, 15):
        changed = tokens.at[:, t].set((tokens[:, t] + 5) % 17)
        out = forward(params, changed)
        np.testing.assert_allclose(np.asarray(base[:, :t]), np.asarray(out[:, :t]), atol=1e-6, rtol=0)
        assert not np.allclose(base[:, t], out[:, t])


# ----------------------------------------------------------------------------- ALiBi extrapolation

def markov_stream(n, seed, vocab=13):
    """Each token is (3 * previous + 1 + noise) mod vocab, noise in {0, 1}: a repetitive stream
    with one bit of entropy per token (the best loss is ln 2)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, np.int32)
    for i in range(1, n):
        out[i] = (3 * out[i - 1] + 1 + rng.integers(0, 2)) % vocab
    return out


def test_alibi_trained_short_evaluates_longer():
    cfg = TransformerConfig(vocab_size=13, num_layers=2, num_heads=4, embed_dim=32, max_len=16,
                            positions="alibi", norm="rmsnorm", mlp="swiglu", use_bias=False)
    model = Decoder(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p, x):
        logits = model.apply({"params": p}, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    @jax.jit
    def step(p, s, x):
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    train = markov_stream(20_000, seed=0)
    rng = np.random.default_rng(1)
    for _ in range(40):
        starts = rng.integers(0, len(train) - 17, 16)
        params, state, _ = step(params, state, jnp.asarray(np.stack([train[s:s + 17] for s in starts])))

    val = markov_stream(8 * 129 + 1, seed=2)
    long = jnp.asarray(val[:8 * 129].reshape(8, 129))        # 128 inputs: 8x the training length
    logits = jax.jit(model.apply)({"params": params}, long[:, :-1])  # no max_len limit for ALiBi
    assert logits.shape == (8, 128, 13) and bool(jnp.isfinite(logits).all())
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, long[:, 1:])
    # The model is causal, so the first 16 positions are exactly a training-length forward.
    in_len, beyond = float(losses[:, :16].mean()), float(losses[:, 16:].mean())
    assert in_len < 0.8 * np.log(13)  # it did learn something
    print(f"ALiBi loss within the training length {in_len:.3f}, beyond it {beyond:.3f}")
    assert beyond < 1.5 * in_len, (in_len, beyond)
    # Learned positions, by contrast, stop at max_len.
    with pytest.raises(ValueError, match="max_len"):
        Decoder(TransformerConfig(vocab_size=13, max_len=16, num_heads=2, embed_dim=8)).init(
            jax.random.key(0), long[:, :-1])


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kw,key", [
    (dict(norm="batchnorm"), "norm"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(mlp="geglu"), "mlp"),
    (dict(mlp_hidden=0), "mlp_hidden"),
    (dict(positions="sinusoidal"), "positions"),
    (dict(positions="rope", num_heads=4, embed_dim=12), "positions"),   # head_dim 3 is odd
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(num_heads=4, embed_dim=16, num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
])
def test_bad_config_values_are_named(kw, key):
    with pytest.raises(ConfigError, match=f"config.model.{key}="):
        TransformerConfig(**{**dict(vocab_size=5, num_heads=2, embed_dim=8), **kw})


def test_llama_shakespeare_config_matches_the_baby_gpt_size():
    from configs.gpt_shakespeare_char import get_config as gpt_config
    from configs.llama_shakespeare_char import get_config as llama_config

    def n_params(config):
        cfg = TransformerConfig.from_dict(config.model.to_dict(), vocab_size=65)
        shapes = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        return cfg, count_params(nn.meta.unbox(shapes["params"]))

    cfg, n = n_params(llama_config())
    assert (cfg.norm, cfg.mlp, cfg.positions, cfg.num_kv_heads, cfg.tie_embeddings, cfg.use_bias) == \
        ("rmsnorm", "swiglu", "rope", 2, False, False)
    assert n == 804_224 and n_params(gpt_config("size=baby"))[1] == 804_096
    n_params(llama_config("smoke"))  # a valid config
