"""Preference data (ground-truth rules, bad-pair accounting, response masks), the SFT loss mask
and rollouts. The response-only loss is checked against a NumPy cross-entropy of the response
positions; rollouts against themselves (same seed, same tokens)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from research.data import preferences as prefs
from research.data.tokenizers import CharTokenizer
from research.models.transformer import Decoder, TransformerConfig
from research.rlhf import losses
from research.rlhf.rollout import policy_stats, sample_responses
from research.tasks.sft import response_loss

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.\n")


def test_preference_rules():
    p = prefs.Preference("avoid_chars", "e")
    assert p.score("what a day") == 1.0 and p.score("Every day") == 0.0
    assert p.rate(["abc", "eee", "xyz", "e"]) == 0.5
    w = prefs.Preference("avoid_words", "the,and")
    assert w.score("then andrew went") == 1.0 and w.score("The cat") == 0.0
    assert prefs.Preference("contains", "love").score("my LOVE is") == 1.0
    with pytest.raises(ConfigError, match="preference.kind"):
        prefs.Preference("rhymes", "x")


def test_bad_pairs_are_counted_and_all_bad_is_refused():
    pairs = [("a prompt", "good", "bad"), ("a prompt", "same", "same"), ("a prompt", "", "x"),
             ("", "x", "y"), ("a very long prompt indeed", "good", "bad"), ("ok", "Q", "x")]
    kept, report = prefs.validate_pairs(pairs, TOK, max_len=16)
    assert kept == [("a prompt", "good", "bad")]
    assert report == {"total": 6, "kept": 1, "identical": 1, "empty_response": 1,
                      "empty_prompt": 1, "too_long": 1, "unknown_chars": 1}
    assert "dropped: empty_prompt 1" in prefs.format_report(report)
    with pytest.raises(ConfigError, match="No usable preference pair among 2"):
        prefs.validate_pairs(pairs[1:3], TOK, max_len=16)


def test_generated_pairs_follow_the_rule():
    text = "the cat sat on a mat and did not move at all, oh no.\n" * 40
    pref = prefs.Preference("avoid_chars", "e")
    pairs = prefs.make_pairs(text, 20, prompt_len=10, response_len=6, preference=pref, seed=0)
    assert len(pairs) == 20
    for prompt, chosen, rejected in pairs:
        assert len(prompt) == 10 and len(chosen) == len(rejected) == 6
        assert pref.score(chosen) == 1.0 and pref.score(rejected) == 0.0


def test_encoding_masks_the_response_only():
    tokens, mask = prefs.encode_example(TOK, "abc", "de", max_len=8)
    np.testing.assert_array_equal(tokens[:5], TOK.encode("abcde"))
    np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1, 0, 0, 0])


def test_sft_loss_counts_response_tokens_only():
    rng = np.random.default_rng(0)
    tokens, mask = prefs.encode_example(TOK, "hello ", "world", max_len=16)
    tokens, mask = tokens[None], mask[None]
    logits = rng.normal(size=(1, 15, TOK.vocab_size)).astype(np.float32)
    loss, _ = response_loss(jnp.asarray(logits), jnp.asarray(tokens[:, 1:]), jnp.asarray(mask[:, 1:]))
    # NumPy: cross-entropy at the positions predicting the 5 response tokens (targets 6..10)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.mean([logp[0, t - 1, tokens[0, t]] for t in range(6, 11)])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    # Prompt and padding logits do not matter.
    other = logits.copy()
    other[0, :5] = rng.normal(size=other[0, :5].shape)
    other[0, 10:] = 0
    loss2, _ = response_loss(jnp.asarray(other), jnp.asarray(tokens[:, 1:]), jnp.asarray(mask[:, 1:]))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_array_sampler_is_deterministic_and_resumable():
    arrays = {"x": np.arange(100)}
    a = prefs.ArraySampler(arrays, 8, seed=3)
    first = [next(a)["x"] for _ in range(3)]
    b = prefs.ArraySampler(arrays, 8, seed=3)
    b.set_state({"seed": 3, "step": 2})
    np.testing.assert_array_equal(next(b)["x"], first[2])


def _tiny_model():
    cfg = TransformerConfig(vocab_size=TOK.vocab_size, num_layers=1, num_heads=2, embed_dim=16,
                            max_len=24)
    model = Decoder(cfg)
    # jitted: eager init/apply of even a tiny model costs seconds of op-by-op dispatch
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 24), jnp.int32))["params"]
    return model, nn.meta.unbox(params)


def test_rollouts_are_deterministic_by_seed():
    model, params = _tiny_model()
    prompts = np.stack([TOK.encode("to be or"), TOK.encode("not to b")]).astype(np.int32)
    t1, m1 = sample_responses(model, params, prompts, jax.random.key(5), response_len=10)
    t2, _ = sample_responses(model, params, prompts, jax.random.key(5), response_len=10)
    t3, _ = sample_responses(model, params, prompts, jax.random.key(6), response_len=10)
    np.testing.assert_array_equal(t1, t2)
    assert not np.array_equal(t1, t3)
    np.testing.assert_array_equal(t1[:, :8], prompts)
    np.testing.assert_array_equal(m1[0], [0] * 8 + [1] * 10)
    # The per-token log-probs of the sampled tokens are the model's log-softmax at each step.
    stats = jax.jit(policy_stats, static_argnums=0)(model, params, t1)
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, t1)
    want = jax.nn.log_softmax(logits, -1)[0, 8 - 1, t1[0, 8]]
    assert float(stats["logp"][0, 8]) == pytest.approx(float(want), rel=1e-5)
    # KL penalty of the policy against itself: zero.
    kl = losses.masked_sum(losses.kl_penalty(stats["logp"], stats["logp"]), m1, axis=1)
    np.testing.assert_array_equal(kl, 0.0)
