"""Prompt and prefix tuning (research.peft.prompt) on the project's decoder."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from research.models.transformer import init_caches
from research.peft import prompt
from tests.peft.helpers import CFG, lm_loss, nbytes, tiny, train_steps


def _unchanged(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_prompt_tuning_prepends_virtual_embeddings_and_trains_only_them():
    model, boxed, tokens = tiny()
    base = nn.meta.unbox(boxed)
    cfg = prompt.PromptConfig(num_virtual=3, init="text")
    pr = prompt.init_prompt(jax.random.key(0), base["token_embed"]["embedding"], cfg,
                            text_ids=[4, 5])
    # 'text' init: the embeddings of the text's tokens, cycled.
    np.testing.assert_array_equal(pr["embedding"], base["token_embed"]["embedding"][jnp.array([4, 5, 4])])
    run = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    out = prompt.prompt_apply(lambda t: run(base, t), pr)(prompt.pad_tokens(tokens, 3))
    # With a text init the virtual tokens ARE those tokens: the same as prepending them.
    prefixed = jnp.concatenate([jnp.broadcast_to(jnp.array([4, 5, 4]), (2, 3)), tokens], axis=1)
    np.testing.assert_allclose(out, run(base, prefixed), atol=1e-6)
    state = {"base": base, "prompt": pr}

    def loss(p):
        logits = prompt.prompt_apply(lambda t: run(p["base"], t), p["prompt"])(
            prompt.pad_tokens(tokens, 3))[:, 3:]
        return lm_loss(logits, tokens)

    new, opt_state = train_steps(loss, state, n=2)
    _unchanged(new["base"], base)
    assert not np.array_equal(new["prompt"]["embedding"], pr["embedding"])
    assert nbytes(opt_state) <= 2 * nbytes(pr) + 64


def test_prefix_tuning_through_the_kv_cache_and_materialize():
    model, boxed, tokens = tiny()
    base = nn.meta.unbox(boxed)
    cfg = prompt.PrefixConfig(num_virtual=4, hidden=8, embed_dim=6)
    template = init_caches(CFG, 1, 4)
    pf = prompt.init_prefix(jax.random.key(0), template, cfg)
    assert pf["w2"].shape == (8, CFG.num_layers * 2 * CFG.embed_dim)

    def logits(base, prefix):
        values = prompt.prefix_values(prefix, template)
        caches = prompt.prefix_caches(values, 2, 4 + tokens.shape[1], jnp.float32)
        return model.apply({"params": base}, tokens, caches, 4, method="decode")[0]

    out = logits(base, pf)
    assert out.shape == (2, tokens.shape[1], CFG.vocab_size)
    # The prefix matters (tokens attend to it) and the materialised prefix gives the same output.
    assert float(jnp.max(jnp.abs(out - model.apply({"params": base}, tokens)))) > 1e-3
    np.testing.assert_allclose(logits(base, prompt.materialize(pf, template)), out, atol=1e-6)
    state = {"base": base, "prefix": pf}
    new, _ = train_steps(lambda p: lm_loss(logits(p["base"], p["prefix"]), tokens), state, n=2)
    _unchanged(new["base"], base)
    for k in ("embed", "w1", "w2", "b2"):
        assert not np.array_equal(new["prefix"][k], pf[k]), k


def test_prompt_random_init_and_bad_config():
    """'random': normal with the embedding table's standard deviation (Lester et al. 2021's random
    init, scaled to the table); bad sizes/inits are ConfigErrors naming the key."""
    table = jax.random.normal(jax.random.key(0), (50, 32)) * 0.3
    cfg = prompt.PromptConfig(num_virtual=400, init="random")
    pr = prompt.init_prompt(jax.random.key(1), table, cfg)
    assert pr["embedding"].shape == (400, 32)
    np.testing.assert_allclose(float(jnp.std(pr["embedding"])), float(jnp.std(table)), rtol=0.05)
    assert abs(float(jnp.mean(pr["embedding"]))) < 0.01
    with pytest.raises(ConfigError, match="prompt init='vocab'"):
        prompt.PromptConfig(init="vocab")
    with pytest.raises(ConfigError, match="num_virtual=0"):
        prompt.PromptConfig(num_virtual=0)
    with pytest.raises(ConfigError, match="needs a non-empty text"):
        prompt.init_prompt(jax.random.key(1), table, prompt.PromptConfig(init="text"), [])
