"""The masked-LM task (research/tasks/mlm.py): BERT's masking rule (15% chosen; 80% [MASK], 10%
random, 10% unchanged, Devlin et al. 2019 section 3.1) checked statistically on a large batch, the
example format, determinism and checkpointable state, the loss, config errors, and one launcher
run of the smoke config."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from research.data.tokenizers import CharTokenizer
from research.tasks.mlm import MaskedLMSampler, MLMVocab, check_masking, masked_lm_loss
from tests import e2e

CHARS = "abcdefghijklmnopqrst"  # 20 characters
VOCAB = MLMVocab(CharTokenizer(CHARS))
TEXT = np.random.default_rng(0).integers(0, len(CHARS), 5000).astype(np.int32)
SPECIAL_IDS = (VOCAB.pad_id, VOCAB.mask_id, VOCAB.cls_id, VOCAB.sep_id)


def sampler(seed=0, batch=8, seq_len=32, **masking):
    return MaskedLMSampler(TEXT, VOCAB, batch, seq_len, seed, masking)


def test_masking_fractions_on_a_large_batch():
    b = sampler(batch=1024, seq_len=64).batch_at(0)
    text = ~np.isin(b["targets"], SPECIAL_IDS)  # positions holding a character
    chosen = b["weights"] > 0
    n_text, n_chosen = text.sum(), chosen.sum()
    assert n_text > 50_000
    # 15% of the character positions; binomial standard deviation ~0.0015 -> 5 sigma ~ 0.008.
    assert abs(n_chosen / n_text - 0.15) < 0.008
    masked = chosen & (b["inputs"] == VOCAB.mask_id)
    same = chosen & (b["inputs"] == b["targets"])
    other = chosen & ~masked & ~same
    c = VOCAB.num_chars  # a random replacement equals the original with probability 1/c
    sigma = lambda p: 5 * math.sqrt(p * (1 - p) / n_chosen)  # noqa: E731
    assert abs(masked.sum() / n_chosen - 0.8) < sigma(0.8)
    assert abs(other.sum() / n_chosen - 0.1 * (1 - 1 / c)) < sigma(0.1)
    assert abs(same.sum() / n_chosen - (0.1 + 0.1 / c)) < sigma(0.1)
    # Random replacements are characters, never special tokens; unchosen positions are intact.
    assert np.all(b["inputs"][other] < c)
    np.testing.assert_array_equal(b["inputs"][~chosen], b["targets"][~chosen])


def test_special_and_pad_positions_are_never_chosen():
    b = sampler(batch=512, seq_len=32, short_seq_prob=0.5).batch_at(3)
    special = np.isin(b["targets"], SPECIAL_IDS)
    assert (~b["padding"]).sum() > 1000  # short examples were padded
    assert not np.any(b["weights"][special] > 0)
    assert not np.any(b["weights"][~b["padding"]] > 0)
    assert np.all(b["inputs"][~b["padding"]] == VOCAB.pad_id)


def test_example_format():
    """[CLS] A [SEP] B [SEP] [PAD]...: A and B one contiguous stretch of the text, token types 0
    then 1, padding exactly the [PAD]s."""
    b = sampler(batch=64, seq_len=24, short_seq_prob=0.5).batch_at(1)
    for row in range(64):
        t, ty, pad = b["targets"][row], b["token_types"][row], b["padding"][row]
        assert t[0] == VOCAB.cls_id
        seps = np.flatnonzero(t == VOCAB.sep_id)
        assert len(seps) == 2 and seps[0] >= 2 and seps[1] > seps[0] + 1
        n_real = seps[1] + 1
        np.testing.assert_array_equal(pad, np.arange(24) < n_real)
        assert np.all(t[n_real:] == VOCAB.pad_id)
        np.testing.assert_array_equal(ty, (np.arange(24) > seps[0]) & pad)
        chars = np.concatenate([t[1:seps[0]], t[seps[0] + 1:seps[1]]])
        starts = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(TEXT, len(chars))
                                .__eq__(chars).all(axis=1))
        assert len(starts) >= 1
    assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32


def test_deterministic_by_seed_and_resumable_from_state():
    a, b = sampler(seed=5), sampler(seed=5)
    for _ in range(3):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = sampler(seed=6).batch_at(0)
    assert not np.array_equal(other["inputs"], sampler(seed=5).batch_at(0)["inputs"])
    state = a.get_state()
    assert state == {"seed": 5, "step": 3}
    resumed = sampler(seed=5)
    resumed.set_state(state)
    x, y = next(a), next(resumed)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="seed 5"):
        sampler(seed=7).set_state(state)


def test_loss_counts_only_the_chosen_positions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 10, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (4, 10))
    weights = (rng.random((4, 10)) < 0.3).astype(np.float32)
    loss, acc = masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    w = weights > 0
    np.testing.assert_allclose(float(loss), nll[w].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(acc), (logits.argmax(-1) == targets)[w].mean(), rtol=1e-6)
    changed = np.where(w[..., None], logits, 100 * rng.normal(size=logits.shape))
    loss2, _ = masked_lm_loss(jnp.asarray(changed), jnp.asarray(targets), jnp.asarray(weights))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_bad_masking_settings_are_config_errors():
    assert check_masking({})["mask_rate"] == 0.15
    with pytest.raises(ConfigError, match="mask_token_prob \\+ random_token_prob"):
        check_masking(dict(mask_token_prob=0.9, random_token_prob=0.2))
    with pytest.raises(ConfigError, match="config.masking.mask_rate=1.5"):
        check_masking(dict(mask_rate=1.5))
    with pytest.raises(ConfigError, match="Unknown config.masking keys \\['mask_ratio'\\]"):
        check_masking(dict(mask_ratio=0.2))
    with pytest.raises(ConfigError, match="max_len=4 is too short"):
        MaskedLMSampler(TEXT, VOCAB, 2, 4, 0)


def test_smoke_config_trains_through_the_launcher(shakespeare_env, tmp_path):
    """The real launcher on configs/bert_mlm_shakespeare.py:smoke; then the same workdir with
    another model is refused (the task's meta() names the difference)."""
    config = "configs/bert_mlm_shakespeare.py:smoke"
    proc = e2e.launch(tmp_path, config=config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = e2e.metrics_rows(tmp_path)
    evals = [r for r in rows if "val/masked_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0.0 <= r["val/masked_accuracy"] <= 1.0 for r in evals)
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    # The vocabulary is tiny Shakespeare's 65 characters + 4 special tokens; at initialisation the
    # loss is about ln(69) = 4.23, and six steps bring the validation loss down.
    assert evals[0]["val/loss"] < 4.3 and evals[1]["val/loss"] < evals[0]["val/loss"]
    assert abs(evals[1]["val/perplexity"] - math.exp(evals[1]["val/loss"])) < 1e-3
    assert e2e.finished_steps(tmp_path) == [3, 6]
    refused = e2e.launch(tmp_path, "--config.model.type_vocab_size=3", config=config)
    e2e.assert_clean_error(refused, "Config error:", "different model",
                           "model.type_vocab_size: checkpoint 2 vs config 3")
