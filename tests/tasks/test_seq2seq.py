"""Tests of research.tasks.seq2seq.Seq2SeqTask: the masked teacher-forced loss (against a numpy
cross-entropy), the evaluation metrics computed inside the jitted eval step (against exact match
and BLEU from research.eval.text_metrics / sacrebleu on the decoded strings), and one end-to-end
launcher run of configs/seq2seq_arithmetic.py:smoke."""
import jax
import numpy as np
import pytest

from configs.seq2seq_arithmetic import get_config
from research.data.arithmetic import EOS, PAD, Vocab
from research.eval import text_metrics
from research.tasks import seq2seq as s2s
from research.core.config import ConfigError
from tests.e2e import launch, metrics_rows

SMOKE = "configs/seq2seq_arithmetic.py:smoke"


@pytest.fixture(scope="module")
def task_and_params():
    task = s2s.Seq2SeqTask(get_config("smoke"))
    return task, jax.jit(task.init)(jax.random.key(0))


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_is_masked_cross_entropy(task_and_params):
    """Against a float64 numpy cross-entropy over the non-PAD targets; label smoothing (train
    only) against (1 - e) * nll + e * mean over the vocabulary of -log p. The weights are
    perturbed (+0.3 N(0, 1)) so that the logits are far from uniform and smoothing shows."""
    task, params = task_and_params
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    batch = task.eval_batches(16)[0]
    logits = np.asarray(task.model.apply({"params": params}, batch["src"], batch["tgt_in"]),
                        np.float64)
    lp = log_softmax(logits)
    tgt = batch["tgt_out"]
    mask = tgt != PAD
    assert (~mask).any()  # the batch has padding to ignore
    nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    expected = nll[mask].mean()
    loss, metrics = jax.jit(task.loss, static_argnums=3)(params, batch, jax.random.key(1), True)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["token_accuracy"],
                               (lp.argmax(-1) == tgt)[mask].mean(), rtol=1e-6)
    # A task configured with label smoothing (a new task: jit traces bake the setting in).
    config = get_config("smoke")
    config.label_smoothing = 0.1
    smoothed = s2s.Seq2SeqTask(config)
    loss_ls, m = jax.jit(smoothed.loss, static_argnums=3)(params, batch, jax.random.key(1), True)
    smooth = 0.9 * nll + 0.1 * (-lp.mean(-1))
    assert abs(smooth[mask].mean() - expected) > 0.01  # the two differ: the check means something
    np.testing.assert_allclose(loss_ls, smooth[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["nll"], expected, rtol=1e-5)  # what evaluation reports


def test_exact_match_and_bleu_stats_match_text_metrics():
    """Random hypotheses (EOS at random places, junk after it) against random references:
    token-level exact match == text_metrics.exact_match on the decoded strings; BLEU from the
    device statistics summed over two batches == text_metrics.bleu (sacrebleu) on the whole
    corpus of space-separated characters == sacrebleu with tokenize='char'."""
    import sacrebleu
    rng = np.random.default_rng(0)
    vocab = Vocab()
    n, length = 64, 9
    ref = rng.integers(3, vocab.vocab_size, (n, length))
    ref_len = rng.integers(1, length, n)
    ref[np.arange(length)[None] > ref_len[:, None]] = PAD
    ref[np.arange(n), ref_len] = EOS
    hyp = ref.copy()
    flip = rng.random(hyp.shape) < 0.15
    hyp[flip] = rng.integers(3, vocab.vocab_size, flip.sum())
    cut = rng.random(n) < 0.3  # some hypotheses end early or late
    hyp[cut, rng.integers(0, length, cut.sum())] = EOS
    hyp[rng.random(n) < 0.1, :] = 5  # some with no EOS at all
    hyps = [vocab.decode(r) for r in hyp]
    refs = [vocab.decode(r) for r in ref]
    assert 0 < sum(h == r for h, r in zip(hyps, refs)) < n

    em = np.asarray(jax.jit(s2s.exact_match)(hyp, ref))
    assert em.mean() == text_metrics.exact_match(hyps, refs, normalize=False)
    stats_fn = jax.jit(s2s.bleu_stats)
    stats = np.asarray(stats_fn(hyp[:40], ref[:40])) + np.asarray(stats_fn(hyp[40:], ref[40:]))
    score = s2s.bleu_from_stats(stats)
    spaced = lambda xs: [" ".join(x) for x in xs]  # noqa: E731
    assert 5 < score < 95
    np.testing.assert_allclose(score, text_metrics.bleu(spaced(hyps), spaced(refs)), rtol=1e-9)
    np.testing.assert_allclose(score, sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score,
                               rtol=1e-9)


def test_jitted_eval_equals_host_side_metrics(task_and_params):
    """The eval step's exact match and BLEU (greedy) equal those of the decoded strings
    (Seq2SeqTask.predict) scored by text_metrics; half of the references are set to the model's
    own greedy answers so that exact match is far from 0. (Beam search's metrics go through the
    same functions; its decoding is tested in tests/generate/test_seq2seq_generate.py.)"""
    task, params = task_and_params
    batches = task.eval_batches(16)
    vocab = task.vocab
    problems = [[vocab.decode(r) for r in b["src"]] for b in batches]
    greedy = [task.predict(params, p) for p in problems]
    refs = []
    for b, g in zip(batches, greedy):
        for i in range(0, 16, 2):  # the model's own answer, then EOS
            ids = (vocab.encode(g[i]) + [EOS])[: task.spec.tgt_len]
            b["tgt_out"][i] = PAD
            b["tgt_out"][i, :len(ids)] = ids
        refs.append([vocab.decode(r) for r in b["tgt_out"]])
    step = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(0), False)[1])
    sums = [jax.device_get(step(params, b)) for b in batches]
    means = {k: float(np.mean([m[k] for m in sums])) for k in sums[0]}
    out = task.summarize_eval(means)
    flat = lambda xs: [x for part in xs for x in part]  # noqa: E731
    spaced = lambda xs: [" ".join(x) for x in flat(xs)]  # noqa: E731
    em = text_metrics.exact_match(flat(greedy), flat(refs), normalize=False)
    assert em >= 0.5
    np.testing.assert_allclose(out["exact_match"], em, rtol=1e-6)
    assert 0.0 <= out["exact_match_beam"] <= 1.0 and 0.0 <= out["bleu_beam"] <= 100.0
    np.testing.assert_allclose(out["bleu"], text_metrics.bleu(spaced(greedy), spaced(refs)),
                               rtol=1e-9)
    assert not any(k.startswith("bleu_stats") for k in out)


def test_launcher_smoke_run_reports_exact_match(tmp_path):
    proc = launch(tmp_path / "run", config=SMOKE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in metrics_rows(tmp_path / "run") if "val/exact_match" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        for key in ("val/exact_match", "val/exact_match_beam", "val/bleu", "val/bleu_beam"):
            assert 0.0 <= r[key] <= (1.0 if "exact" in key else 100.0), (key, r[key])
        assert np.isfinite(r["val/loss"]) and 0 <= r["val/token_accuracy"] <= 1


@pytest.mark.parametrize("key,value,match", [
    ("model.max_len", 5, "config.model.max_len=5 is too short .* max_len >= 8"),
    ("decode.num_beams", 0, "config.decode.num_beams=0"),
    ("data.ops", "/", "config.data.ops='/'"),
    ("data.name", "wmt", "config.data.name='wmt'"),
    ("data.test_size", 10 ** 6, "config.data.test_size=1000000 is too large"),
])
def test_config_errors_name_the_key(key, value, match):
    config = get_config("smoke")
    section, leaf = key.split(".")
    with config.unlocked():
        config[section][leaf] = value
    with pytest.raises(ConfigError, match=match):
        s2s.Seq2SeqTask(config)
