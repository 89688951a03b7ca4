"""Tests for research.generate: filters, sampling, and KV-cached generation vs naive recompute."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generate import apply_temperature, generate, sample_token, top_k_filter, top_p_filter
from research.generate import sampling
from research.models.transformer import Decoder, TransformerConfig, init_caches

CFG = TransformerConfig(vocab_size=11, num_layers=2, num_heads=2, embed_dim=16, max_len=16)
PARAM_SCALE = 5.0
PROBS = np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32)


# Module-level jitted functions (params as an argument) so all tests share their compilations.
forward = jax.jit(lambda p, t: Decoder(CFG).apply({"params": p}, t))
decode = jax.jit(lambda p, t, c, i: Decoder(CFG).apply({"params": p}, t, c, i, method="decode"))
sample = jax.jit(sample_token, static_argnames=("temperature", "top_k", "top_p", "greedy"))
top_p = jax.jit(top_p_filter)
top_k = jax.jit(top_k_filter, static_argnums=1)


@pytest.fixture(scope="module")
def model_and_params():
    """A random model. Parameters are drawn with numpy on the shapes from ``eval_shape`` (no init
    compile); the std 0.02 * PARAM_SCALE gives logits far from uniform (|logits| up to ~5), so
    greedy outputs vary. LayerNorm scales are 1 + noise."""
    model = Decoder(CFG)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                     jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        x = rng.normal(0.0, 0.02 * PARAM_SCALE, leaf.shape).astype(np.float32)
        return jnp.asarray(x + (jax.tree_util.keystr(path).endswith("['scale']")))
    return model, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def last_logits(model_and_params):
    """Full forward of each row of ``tokens [B, T <= max_len]``, logits at the last position.

    The sequence is right-padded to max_len so every call reuses one compiled program; the
    model is causal, so the padding cannot affect the logits at position T - 1."""
    def fn(tokens):
        tokens = np.asarray(tokens)
        padded = np.pad(tokens, ((0, 0), (0, CFG.max_len - tokens.shape[1])))
        logits = forward(model_and_params[1], jnp.asarray(padded))
        return np.asarray(logits)[:, tokens.shape[1] - 1]
    return fn


def kept(logits):
    return set(np.flatnonzero(np.isfinite(np.asarray(logits))).tolist())


# ----------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("scale", [1.0, PARAM_SCALE], ids=["init", "scaled"])
def test_kv_cache_decode_matches_full_forward(model_and_params, scale):
    _, params = model_and_params
    params = jax.tree.map(lambda x: x * (scale / PARAM_SCALE), params)  # scale 1: ~init std
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, CFG.max_len), 0, CFG.vocab_size)
    expected = forward(params, tokens)
    n_prefill = 5
    logits, caches = decode(params, tokens[:, :n_prefill], init_caches(CFG, 2), 0)
    got = [logits]
    for i in range(n_prefill, CFG.max_len):  # one T=1 step per position
        logits, caches = decode(params, tokens[:, i:i + 1], caches, i)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- generate

def naive_generate(last_logits, prompt, n_new, max_len, pick=None, window=True):
    """Reference: a full forward over the whole context for every new token, then
    ``pick(position, logits)`` (argmax by default). With ``window``, generate's context rule:
    the context starts at s (the last max_len prompt tokens at first); when it would exceed
    max_len tokens, s jumps so that the context is the last max_len // 2 tokens."""
    pick = pick or (lambda n, logits: np.argmax(logits, -1))
    seq = np.asarray(prompt)
    s = max(0, seq.shape[1] - max_len) if window else 0
    for _ in range(n_new):
        n = seq.shape[1]
        if window and n - s > max_len:
            s = n - max_len // 2
        seq = np.concatenate([seq, np.asarray(pick(n, last_logits(seq[:, s:n])))[:, None]], 1)
    return seq


@pytest.fixture(scope="module")
def greedy_case(model_and_params, last_logits):
    """Prompt [2, 3] extended by 40 tokens (well past max_len=16): generate vs naive loop."""
    model, params = model_and_params
    prompt = jax.random.randint(jax.random.PRNGKey(3), (2, 3), 0, CFG.vocab_size)
    out = generate(model, params, prompt, max_new_tokens=40, rng=None, greedy=True)
    return prompt, out, naive_generate(last_logits, prompt, 40, CFG.max_len)


def test_greedy_generate_within_context_matches_naive(greedy_case, last_logits):
    prompt, out, _ = greedy_case
    assert out.shape == (2, 43) and out.dtype == jnp.int32
    n_within = CFG.max_len - 3  # the first 13 new tokens fit in one context window
    plain = naive_generate(last_logits, prompt, n_within, CFG.max_len, window=False)
    np.testing.assert_array_equal(out[:, :CFG.max_len], plain)


def test_greedy_generate_beyond_context_matches_naive(greedy_case):
    _, out, expected = greedy_case
    np.testing.assert_array_equal(out, expected)
    assert len(np.unique(np.asarray(out)[:, 3:])) > 2  # not a degenerate constant output


def test_greedy_generate_crops_long_prompt(model_and_params, last_logits):
    model, params = model_and_params
    prompt = jax.random.randint(jax.random.PRNGKey(20), (2, 20), 0, CFG.vocab_size)
    out = generate(model, params, prompt, max_new_tokens=30, rng=None, greedy=True)
    assert out.shape == (2, 50)
    np.testing.assert_array_equal(out, naive_generate(last_logits, prompt, 30, CFG.max_len))


def test_greedy_generate_short_total_length(model_and_params, last_logits):
    # prompt + new tokens < max_len // 2: the cache-refill branch cannot be traced (its slice
    # would be wider than the buffer) and must not be built.
    model, params = model_and_params
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    out = generate(model, params, prompt, max_new_tokens=2, rng=None, greedy=True)
    np.testing.assert_array_equal(out, naive_generate(last_logits, prompt, 2, CFG.max_len))


def test_sampling_determinism_keys_and_single_compile(model_and_params, last_logits):
    model, params = model_and_params
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    settings = dict(temperature=1.0, top_k=8, top_p=0.95)
    gen = lambda seed: generate(  # noqa: E731
        model, params, prompt, max_new_tokens=40, rng=jax.random.PRNGKey(seed), **settings)
    before = sum(sampling.TRACE_COUNTS.values())
    a, b, c = gen(0), gen(0), gen(1)
    assert sum(sampling.TRACE_COUNTS.values()) - before == 1  # compiled once for all 3 calls
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).sum() > 10
    # The token at position n is sample_token(fold_in(rng, n), logits, **settings): a naive
    # loop with the same keys and filters reproduces the whole run (so the keys do not depend
    # on the cache windows, and generate applies the filters like sample_token).
    pick = lambda n, logits: sample(  # noqa: E731
        jax.random.fold_in(jax.random.PRNGKey(0), n), jnp.asarray(logits), **settings)
    np.testing.assert_array_equal(a, naive_generate(last_logits, prompt, 40, CFG.max_len, pick))


# ----------------------------------------------------------------------------- filters

@pytest.mark.parametrize("shift", [0.0, 3.0, -1.7])
def test_top_p_keeps_exact_nucleus(shift):
    logits = jnp.log(jnp.asarray(PROBS)) + shift
    assert kept(top_p(logits, 0.7)) == {0, 1}
    assert kept(top_p(logits, 0.71)) == {0, 1, 2}
    assert kept(top_p(logits, 0.5)) == {0}
    assert kept(top_p(logits, 0.3)) == {0}   # always at least the top token
    assert kept(top_p(logits, 1e-9)) == {0}
    assert kept(top_p(logits, 0.96)) == {0, 1, 2, 3, 4}
    assert kept(top_p(logits, 1.0)) == {0, 1, 2, 3, 4}
    # Permuted order and batched [..., V] input.
    perm = np.array([3, 0, 4, 1, 2])
    batched = jnp.stack([logits[perm], logits])
    out = np.isfinite(np.asarray(top_p(batched, 0.7)))
    assert set(np.flatnonzero(out[0])) == {1, 3} and set(np.flatnonzero(out[1])) == {0, 1}


def test_top_k_keeps_k_largest_with_ties_to_lowest_index():
    logits = jnp.log(jnp.asarray(PROBS))
    assert kept(top_k(logits, 2)) == {0, 1}
    assert kept(top_k(logits, 1)) == {0}
    assert kept(top_k(logits, 99)) == {0, 1, 2, 3, 4}
    assert kept(top_k(jnp.array([1.0, 3.0, 3.0, 3.0, 0.0]), 2)) == {1, 2}
    out = top_k(logits[None, None, :].repeat(3, axis=1), 3)
    assert out.shape == (1, 3, 5) and np.isfinite(np.asarray(out)).sum() == 9
    np.testing.assert_array_equal(top_k(logits, 3)[:3], logits[:3])  # kept values intact


def test_filtered_distributions_are_renormalised():
    logits = jnp.log(jnp.asarray(PROBS))
    np.testing.assert_allclose(jax.nn.softmax(top_k(logits, 2)),
                               [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(jax.nn.softmax(top_p(logits, 0.71)),
                               [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=1e-6)
    # Empirical check through sample_token (top-p 0.71 after temperature 1 keeps {0, 1, 2}).
    n = 40_000
    samples = sample(jax.random.PRNGKey(0), jnp.broadcast_to(logits, (n, 5)), top_p=0.71)
    freq = np.bincount(np.asarray(samples), minlength=5) / n
    np.testing.assert_allclose(freq, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.01)


def test_temperature_scaling_exact():
    logits = jnp.log(jnp.asarray(PROBS))
    np.testing.assert_array_equal(apply_temperature(logits, 0.5), logits * 2.0)
    np.testing.assert_array_equal(apply_temperature(logits, 1.0), logits)
    expected = PROBS ** 2 / (PROBS ** 2).sum()   # temperature 0.5: p^(1/T), renormalised
    np.testing.assert_allclose(jax.nn.softmax(apply_temperature(logits, 0.5)), expected, rtol=1e-5)
    n = 40_000
    samples = sample(jax.random.PRNGKey(1), jnp.broadcast_to(logits, (n, 5)), temperature=0.5)
    assert samples.shape == (n,) and samples.dtype == jnp.int32
    np.testing.assert_allclose(np.bincount(np.asarray(samples), minlength=5) / n, expected,
                               atol=0.01)


def test_sample_token_greedy_and_seed():
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 0.1, (64, 11)), jnp.float32)
    np.testing.assert_array_equal(sample(None, logits, greedy=True, temperature=0.0),
                                  jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample(jax.random.PRNGKey(5), logits, temperature=3.0, top_k=1),
                                  jnp.argmax(logits, -1))
    a = sample(jax.random.PRNGKey(5), logits)
    np.testing.assert_array_equal(a, sample(jax.random.PRNGKey(5), logits))
    assert (np.asarray(a) != np.asarray(sample(jax.random.PRNGKey(6), logits))).sum() > 10


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_arguments_raise(model_and_params, kwargs, name):
    model, params = model_and_params
    with pytest.raises(ValueError, match=name):
        sample_token(jax.random.PRNGKey(0), jnp.zeros((1, 5)), **kwargs)
    with pytest.raises(ValueError, match=name):
        generate(model, params, jnp.ones((1, 2), jnp.int32), max_new_tokens=3,
                 rng=jax.random.PRNGKey(0), **kwargs)


def test_bad_generate_arguments_raise(model_and_params):
    model, params = model_and_params
    prompt = jnp.ones((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, prompt, max_new_tokens=-1, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="prompt"):
        generate(model, params, jnp.ones((2,), jnp.int32), max_new_tokens=1, rng=None,
                 greedy=True)
    with pytest.raises(ValueError, match="rng"):
        generate(model, params, prompt, max_new_tokens=1, rng=None)
    np.testing.assert_array_equal(
        generate(model, params, prompt, max_new_tokens=0, rng=None, greedy=True), prompt)
