"""Sequence-to-sequence training of the encoder-decoder Transformer with teacher forcing, evaluated
by decoding held-out problems (exact match, BLEU) with greedy decoding and beam search.

Config keys read here:
* ``config.model``: ``TransformerConfig`` fields except ``vocab_size`` (from the vocabulary);
  ``max_len`` must hold the source and BOS + the longest target.
* ``config.data``: ``name='arithmetic'``, ``ops`` (e.g. ``'+'``, ``'+*'``), ``min_digits``,
  ``max_digits``, ``test_size`` (held-out problems, never trained on), ``test_seed``.
* ``config.decode``: ``num_beams`` (beam search at eval; 1 = greedy only), ``length_penalty``.
* ``config.label_smoothing`` (the paper: 0.1; training loss only), ``config.eval_batches`` and
  ``config.eval_batch_size``: evaluation decodes the first ``eval_batches * eval_batch_size``
  held-out problems.

The loss is the cross-entropy of ``tgt_out`` given ``(src, tgt_in)`` averaged over non-PAD target
tokens. Every evaluation reports, besides ``val/loss`` (plain cross-entropy) and
``val/token_accuracy`` (teacher-forced):
* ``val/exact_match`` and ``val/bleu``: greedy decoding against the reference answer (the
  characters before EOS, as ``Vocab.decode`` and ``Seq2SeqTask.predict`` read them);
* ``val/exact_match_beam`` and ``val/bleu_beam``: beam search with ``config.decode.num_beams``
  (when > 1).
BLEU is sacrebleu's corpus BLEU (0-100, exponential smoothing) over characters (sacrebleu's
``tokenize='char'``; the same as ``research.eval.text_metrics.bleu`` on space-separated
characters): the n-gram statistics are counted on device in each eval batch, summed over the
batches, and ``sacrebleu``'s ``BLEU.compute_bleu`` turns the corpus totals into the score.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.core.config import ConfigError
from research.data.arithmetic import (
    BOS, EOS, PAD, ArithmeticSpec, ArithmeticStream, Vocab, encode_batch, held_out)
from research.generate import seq2seq as gen
from research.models.seq2seq import EncoderDecoder, check_config, flops_per_example
from research.models.transformer import TransformerConfig, count_params
from research.tasks.base import Task

DATASETS = ("arithmetic",)
BLEU_ORDER = 4


def answer_chars(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The answer's characters as ``Vocab.decode`` reads them: the character tokens (ids > EOS)
    before the first EOS, moved to the front (PAD after them), and their number.
    tokens [B, L] -> ([B, L], [B])."""
    before_eos = jnp.cumsum(tokens == EOS, axis=-1) == 0
    keep = before_eos & (tokens > EOS)
    order = jnp.argsort(~keep, axis=-1, stable=True)
    chars = jnp.where(jnp.take_along_axis(keep, order, -1),
                      jnp.take_along_axis(tokens, order, -1), PAD)
    return chars, jnp.sum(keep, axis=-1)


def exact_match(hyp: jax.Array, ref: jax.Array) -> jax.Array:
    """[B] bool: the decoded answers are equal (``answer_chars`` of ``hyp`` [B, L], decoded
    tokens, and ``ref`` [B, L'], ``tgt_out``: answer, EOS, PAD...)."""
    (h, _), (r, _) = answer_chars(hyp), answer_chars(ref)
    width = max(h.shape[1], r.shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
    return jnp.all(pad(h) == pad(r), axis=-1)


def bleu_stats(hyp: jax.Array, ref: jax.Array, max_order: int = BLEU_ORDER) -> jax.Array:
    """Character BLEU sufficient statistics summed over the batch, as float32
    ``[matches_1..N, totals_1..N, hyp_len, ref_len]`` of the ``answer_chars``: matches are
    clipped n-gram counts (sacrebleu's ``counts``), totals the hypothesis n-gram counts. Exact
    integers for sequences of up to millions of tokens."""
    h, h_len = answer_chars(hyp)
    r, r_len = answer_chars(ref)
    lh, lr = h.shape[1], r.shape[1]
    matches, totals = [], []
    for n in range(1, max_order + 1):
        hv = jnp.arange(lh)[None] + n <= h_len[:, None]          # [B, Lh] valid n-gram starts
        rv = jnp.arange(lr)[None] + n <= r_len[:, None]

        def grams(x, length):  # [B, L, n], padded with -1 beyond the end
            x = jnp.pad(x, ((0, 0), (0, n)), constant_values=-1)
            return jnp.stack([x[:, k:k + length] for k in range(n)], axis=-1)

        gh, gr = grams(h, lh), grams(r, lr)
        eq_hh = jnp.all(gh[:, :, None] == gh[:, None], axis=-1) & hv[:, None, :]
        eq_hr = jnp.all(gh[:, :, None] == gr[:, None], axis=-1) & rv[:, None, :]
        c_h = jnp.sum(eq_hh, axis=-1).astype(jnp.float32)      # occurrences in hyp of gram i
        c_r = jnp.sum(eq_hr, axis=-1).astype(jnp.float32)      # occurrences in ref of gram i
        clip = jnp.where(hv, jnp.minimum(c_h, c_r) / jnp.maximum(c_h, 1.0), 0.0)
        matches.append(jnp.round(jnp.sum(clip)))
        totals.append(jnp.sum(hv).astype(jnp.float32))
    return jnp.stack(matches + totals + [jnp.sum(h_len).astype(jnp.float32),
                                         jnp.sum(r_len).astype(jnp.float32)])


def bleu_from_stats(stats, max_order: int = BLEU_ORDER) -> float:
    """sacrebleu corpus BLEU (0-100, 'exp' smoothing as ``sacrebleu.corpus_bleu``) from summed
    ``bleu_stats``."""
    from sacrebleu.metrics.bleu import BLEU

    s = [int(round(float(x))) for x in stats]
    score = BLEU.compute_bleu(s[:max_order], s[max_order:2 * max_order], s[2 * max_order],
                              s[2 * max_order + 1], smooth_method="exp", max_ngram_order=max_order)
    return float(score.score)


class Seq2SeqTask(Task):
    name = "seq2seq"

    def __init__(self, config):
        self.config = config
        data = config.data
        if data.get("name") not in DATASETS:
            raise ConfigError(f"config.data.name={data.get('name')!r}: expected one of "
                              f"{list(DATASETS)}")
        self.spec = ArithmeticSpec(ops=data.ops, min_digits=data.min_digits,
                                   max_digits=data.max_digits)
        self.vocab = Vocab()
        self.model_config = TransformerConfig.from_dict(
            config.model.to_dict(), vocab_size=self.vocab.vocab_size)
        check_config(self.model_config)
        need = max(self.spec.src_len, self.spec.tgt_len + 1)
        if self.model_config.max_len < need:
            raise ConfigError(
                f"config.model.max_len={self.model_config.max_len} is too short for "
                f"{self.spec.max_digits}-digit problems: sources have up to {self.spec.src_len} "
                f"tokens and decoding needs BOS + {self.spec.tgt_len} target positions; set "
                f"max_len >= {need}.")
        dec = config.get("decode", {})
        self.num_beams = dec.get("num_beams", 1)
        self.length_penalty = dec.get("length_penalty", 1.0)
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, numbers.Integral) \
                or self.num_beams < 1:
            raise ConfigError(f"config.decode.num_beams={self.num_beams!r}: expected an integer "
                              ">= 1 (1 = greedy only).")
        if not isinstance(self.length_penalty, numbers.Real) \
                or not math.isfinite(self.length_penalty):
            raise ConfigError(f"config.decode.length_penalty={self.length_penalty!r}: expected a "
                              "finite number.")
        self.label_smoothing = float(config.get("label_smoothing", 0.0))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"config.label_smoothing={self.label_smoothing}: expected [0, 1).")
        test_size = data.get("test_size", 1000)
        if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
            raise ConfigError(f"config.data.test_size={test_size!r}: expected a positive integer.")
        self.test_problems = held_out(self.spec, test_size, data.get("test_seed", 0))
        self.model = EncoderDecoder(self.model_config, pad_id=PAD)
        self.tokens_per_example = self.spec.src_len + self.spec.tgt_len
        self.n_params = count_params(jax.eval_shape(self.init, jax.random.key(0)))
        self.flops_per_example = flops_per_example(self.model_config, self.spec.src_len,
                                                   self.spec.tgt_len)
        self._n_eval_batches = 0

    # -- the Task interface ---------------------------------------------------------------------
    def init(self, rng):
        src = jnp.zeros((1, self.spec.src_len), jnp.int32)
        tgt = jnp.zeros((1, self.spec.tgt_len), jnp.int32)
        return self.model.init({"params": rng}, src, tgt)["params"]

    def loss(self, params, batch, rng, train: bool = True):
        use_dropout = train and self.model_config.dropout > 0
        logits = self.model.apply({"params": params}, batch["src"], batch["tgt_in"],
                                  deterministic=not train,
                                  rngs={"dropout": rng} if use_dropout else None)
        targets = batch["tgt_out"]
        mask = (targets != PAD).astype(jnp.float32)
        n = jnp.maximum(mask.sum(), 1.0)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        if train and self.label_smoothing > 0:
            labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]),
                                         self.label_smoothing)
            per_token = optax.softmax_cross_entropy(logits, labels)
        else:
            per_token = nll
        loss = jnp.sum(per_token * mask) / n
        metrics = {"loss": loss, "nll": jnp.sum(nll * mask) / n,
                   "token_accuracy": jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / n}
        if not train:
            metrics.update(self.decode_metrics(params, batch))
        return loss, metrics

    def decode_metrics(self, params, batch) -> dict:
        """Exact match and BLEU statistics of greedy (and beam, if num_beams > 1) decoding."""
        ref = batch["tgt_out"]
        out = {}
        hyp = gen.greedy(self.model, params, batch["src"], max_new_tokens=self.spec.tgt_len,
                         bos_id=BOS, eos_id=EOS)
        decodings = {"": hyp}
        if self.num_beams > 1:
            decodings["_beam"], _ = gen.beam_search(
                self.model, params, batch["src"], num_beams=self.num_beams,
                max_new_tokens=self.spec.tgt_len, bos_id=BOS, eos_id=EOS,
                length_penalty=self.length_penalty)
        for suffix, tokens in decodings.items():
            out[f"exact_match{suffix}"] = jnp.mean(exact_match(tokens, ref).astype(jnp.float32))
            stats = bleu_stats(tokens, ref)
            out.update({f"bleu_stats{suffix}/{i}": stats[i] for i in range(stats.shape[0])})
        return out

    def train_data(self, seed: int, batch_size: int) -> ArithmeticStream:
        return ArithmeticStream(self.spec, batch_size, seed, exclude=self.test_problems,
                                vocab=self.vocab)

    def eval_batches(self, batch_size: int) -> list:
        n = self.config.eval_batches
        if n * batch_size > len(self.test_problems):
            raise ConfigError(
                f"config.eval_batches={n} x eval batch size {batch_size} = {n * batch_size} "
                f"problems exceed the held-out set (config.data.test_size="
                f"{len(self.test_problems)}); raise test_size or evaluate fewer batches.")
        self._n_eval_batches = n
        return [encode_batch(self.spec, self.vocab,
                             self.test_problems[i * batch_size:(i + 1) * batch_size])
                for i in range(n)]

    def summarize_eval(self, means):
        out = {k: v for k, v in means.items() if not k.startswith("bleu_stats")}
        out["loss"] = means.get("nll", means.get("loss"))  # eval loss = plain cross-entropy
        out.pop("nll", None)
        for suffix in ("", "_beam"):
            keys = sorted((k for k in means if k.startswith(f"bleu_stats{suffix}/")),
                          key=lambda k: int(k.rsplit("/", 1)[1]))
            if keys:  # means over batches -> corpus sums
                out[f"bleu{suffix}"] = bleu_from_stats(
                    [means[k] * self._n_eval_batches for k in keys])
        return out

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model_config),
                "architecture": "encoder-decoder (sinusoidal positions, tied embeddings)",
                "tokenizer": self.vocab.to_json(), "data": self.spec.to_json(),
                "test_set": {"size": len(self.test_problems),
                             "seed": self.config.data.get("test_seed", 0)}}

    # -- use ------------------------------------------------------------------------------------
    def predict(self, params, problems: list[str], num_beams: int = 1) -> list[str]:
        """Answers to problem texts like ``'123*45='`` (greedy, or beam search)."""
        src = np.full((len(problems), self.spec.src_len), PAD, np.int32)
        for i, p in enumerate(problems):
            ids = self.vocab.encode(p)
            if len(ids) > self.spec.src_len:
                raise ValueError(f"Problem {p!r} is longer than the {self.spec.src_len} source "
                                 "tokens this task was configured for (config.data.max_digits).")
            src[i, :len(ids)] = ids
        kw = dict(max_new_tokens=self.spec.tgt_len, bos_id=BOS, eos_id=EOS)
        if num_beams > 1:
            tokens, _ = gen.beam_search(self.model, params, src, num_beams=num_beams,
                                        length_penalty=self.length_penalty, **kw)
        else:
            tokens = gen.greedy(self.model, params, src, **kw)
        return [self.vocab.decode(row) for row in np.asarray(tokens)]
