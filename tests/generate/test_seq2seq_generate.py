"""Tests of research.generate.seq2seq (greedy decoding and beam search for the encoder-decoder
over the decoder's KV cache). References: the teacher-forced full forward (no cache) for greedy
tokens and for every beam score, and a brute-force enumeration of all target sequences."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generate import seq2seq as gen
from research.models.seq2seq import EncoderDecoder
from research.models.transformer import TransformerConfig

BOS = 1
TINY = TransformerConfig(vocab_size=5, num_layers=1, num_heads=2, embed_dim=16, max_len=8,
                         activation="relu", norm_position="post")
SMALL = TransformerConfig(vocab_size=11, num_layers=2, num_heads=2, embed_dim=16, max_len=12,
                          activation="relu", norm_position="pre")


def random_params(cfg, seed, std, embed_std=None):
    """Random weights; a smaller tied embedding keeps the output from just repeating tokens."""
    shapes = nn.unbox(jax.eval_shape(EncoderDecoder(cfg).init, jax.random.key(0),
                                     jnp.zeros((1, 3), jnp.int32),
                                     jnp.zeros((1, 2), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        s = embed_std if embed_std and name.endswith("['embedding']") else std
        x = rng.normal(0.0, s, leaf.shape).astype(np.float32)
        return jnp.asarray(x + name.endswith("['scale']"))
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def small():
    return EncoderDecoder(SMALL), random_params(SMALL, 1, 0.5, embed_std=0.3)


@pytest.fixture(scope="module")
def tiny():
    return EncoderDecoder(TINY), random_params(TINY, 3, 0.5)


SRC = np.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 3, 4, 5], [10, 2, 0, 0, 0, 0]], np.int32)


@functools.lru_cache(maxsize=None)
def _forward(model):
    return jax.jit(lambda p, s, t: jax.nn.log_softmax(model.apply({"params": p}, s, t)))


def full_logprobs(model, params, src, tgt_in):
    return np.asarray(_forward(model)(params, jnp.asarray(src), jnp.asarray(tgt_in)), np.float64)


def hypothesis_scores(model, params, src, tokens, eos_id, length_penalty):
    """sum log p(token) up to and including the first EOS, / length ** length_penalty, from
    the teacher-forced forward."""
    tokens = np.asarray(tokens)
    tgt_in = np.concatenate([np.full((len(tokens), 1), BOS), tokens[:, :-1]], 1)
    lp = full_logprobs(model, params, src, tgt_in)
    out = []
    for row, l in zip(tokens, lp):
        total, n = 0.0, 0
        for t, tok in enumerate(row):
            total += l[t, tok]
            n += 1
            if tok == eos_id:
                break
        out.append(total / n ** length_penalty)
    return np.array(out)


def test_greedy_is_argmax_of_the_full_forward(small):
    model, params = small
    tokens = np.asarray(gen.greedy(model, params, SRC, max_new_tokens=8, bos_id=BOS))
    assert tokens.shape == (3, 8) and tokens.dtype == np.int32
    tgt_in = np.concatenate([np.full((3, 1), BOS), tokens[:, :-1]], 1)
    np.testing.assert_array_equal(tokens, full_logprobs(model, params, SRC, tgt_in).argmax(-1))
    assert len(np.unique(tokens)) > 2  # not a constant output


def test_greedy_stops_at_eos_and_pads_with_it(small):
    model, params = small
    free = np.asarray(gen.greedy(model, params, SRC, max_new_tokens=8, bos_id=BOS))
    eos = int(free[1, 2])
    tokens = np.asarray(gen.greedy(model, params, SRC, max_new_tokens=8, bos_id=BOS, eos_id=eos))
    for row_free, row in zip(free, tokens):
        hits = np.flatnonzero(row_free == eos)
        n = hits[0] + 1 if len(hits) else 8
        np.testing.assert_array_equal(row[:n], row_free[:n])
        assert np.all(row[n:] == eos)


def test_one_beam_equals_greedy(small):
    model, params = small
    free = np.asarray(gen.greedy(model, params, SRC, max_new_tokens=8, bos_id=BOS))
    for eos in (None, int(free[1, 3])):
        greedy = gen.greedy(model, params, SRC, max_new_tokens=8, bos_id=BOS, eos_id=eos)
        beam, scores = gen.beam_search(model, params, SRC, num_beams=1, max_new_tokens=8,
                                       bos_id=BOS, eos_id=eos)
        np.testing.assert_array_equal(beam, greedy)
        np.testing.assert_allclose(
            scores, hypothesis_scores(model, params, SRC, beam, eos, 1.0), rtol=1e-5, atol=1e-5)


def test_beam_scores_are_recomputed_logprobs(small):
    model, params = small
    eos = int(np.asarray(gen.greedy(model, params, SRC, max_new_tokens=8, bos_id=BOS))[0, 3])
    for lp in (0.0, 1.0, 2.0):
        tokens, scores = gen.beam_search(model, params, SRC, num_beams=3, max_new_tokens=8,
                                         bos_id=BOS, eos_id=eos, length_penalty=lp,
                                         return_all_beams=True)
        assert tokens.shape == (3, 3, 8) and scores.shape == (3, 3)
        assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)  # best first
        src = np.repeat(SRC, 3, axis=0)  # row b's beams
        np.testing.assert_allclose(
            np.asarray(scores).reshape(-1),
            hypothesis_scores(model, params, src, np.asarray(tokens).reshape(-1, 8), eos, lp),
            rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_eos", [False, True])
def test_wide_beam_finds_the_brute_force_optimum(tiny, with_eos):
    """All 5^3 targets of 3 tokens, scored by the full forward; with EOS, each is cut at its
    first EOS (a shorter hypothesis). num_beams = 25 >= every prefix, so beam search is exact."""
    model, params = tiny
    n_new = 3
    src = np.array([[3, 4, 2, 0], [4, 2, 3, 3]], np.int32)  # ids < vocab_size 5
    # EOS: the most likely first token of row 0, so that short hypotheses compete.
    eos_id = int(gen.greedy(model, params, src, max_new_tokens=1, bos_id=BOS)[0, 0]) \
        if with_eos else None
    conts = np.array(list(itertools.product(range(TINY.vocab_size), repeat=n_new)), np.int32)
    for lp in (0.0, 1.0):
        tokens, scores = gen.beam_search(model, params, src, num_beams=25, max_new_tokens=n_new,
                                         bos_id=BOS, eos_id=eos_id, length_penalty=lp)
        for b in range(len(src)):
            s = hypothesis_scores(model, params, np.repeat(src[b:b + 1], len(conts), 0), conts,
                                  eos_id, lp)
            hyps = {}
            for row, score in zip(conts, s):  # distinct hypotheses (cut at EOS)
                row = list(row)
                cut = row[:row.index(eos_id) + 1] if eos_id in row else row
                hyps[tuple(cut)] = score
            ranked = sorted(hyps.items(), key=lambda kv: -kv[1])
            assert ranked[0][1] - ranked[1][1] > 1e-4  # a unique optimum
            best = list(ranked[0][0])
            got = list(np.asarray(tokens[b]))
            assert got[:len(best)] == best, (lp, b, got, ranked[:3])
            assert all(t == eos_id for t in got[len(best):])
            np.testing.assert_allclose(scores[b], ranked[0][1], rtol=1e-5)
            if with_eos and lp == 0.0 and b == 0:
                assert len(best) < n_new  # EOS matters in this case


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=12), "max_len=12"),
    (dict(bos_id=11), "bos_id"),
    (dict(eos_id=-1), "eos_id"),
])
def test_bad_arguments_raise(small, kwargs, match):
    model, params = small
    args = {**dict(max_new_tokens=4, bos_id=BOS), **kwargs}
    with pytest.raises(ValueError, match=match):
        gen.greedy(model, params, SRC, **args)
    with pytest.raises(ValueError, match=match):
        gen.beam_search(model, params, SRC, num_beams=2, **args)
