"""Tests for ``research.eval.text_metrics`` on known values; each states where its value comes
from (closed form, hand computation, or the sacrebleu README)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from research.eval import (
    bits_per_character,
    bits_per_token,
    bleu,
    exact_match,
    mean_token_f1,
    normalize_answer,
    perplexity,
    rouge,
    sentence_bleu,
    token_f1,
)

# ------------------------------------------------------------------------------------------------
# Language modelling
# ------------------------------------------------------------------------------------------------


def test_perplexity_known_values():
    # Definition: perplexity = exp(mean NLL in nats); exp(1) = e, exp(0) = 1.
    assert perplexity(1.0) == pytest.approx(math.e)
    assert perplexity(0.0) == 1.0
    # A uniform model over V tokens has mean NLL ln V, hence perplexity V.
    assert perplexity(math.log(50257)) == pytest.approx(50257)
    # numpy scalars are accepted; overflow gives inf rather than an exception.
    assert perplexity(np.float32(1.0)) == pytest.approx(math.e, rel=1e-6)
    assert perplexity(1e4) == math.inf


def test_bits_per_token():
    # ln 2 nats = 1 bit; a uniform model over 256 tokens has ln 256 nats = 8 bits per token.
    assert bits_per_token(math.log(2)) == pytest.approx(1.0)
    assert bits_per_token(math.log(256)) == pytest.approx(8.0)
    assert 2 ** bits_per_token(1.3) == pytest.approx(perplexity(1.3))


def test_bits_per_character_uniform_65():
    # A uniform distribution over 65 characters (tiny Shakespeare's vocabulary) costs ln 65 nats
    # per character, so over a text of N characters the total NLL is N ln 65 and the bits per
    # character are N ln 65 / ln 2 / N = log2(65) ~= 6.022.
    n = 1000
    assert bits_per_character(n * math.log(65), n) == pytest.approx(math.log2(65))
    # Tokenizer independence: the same text scored by a model with 250 tokens and per-token NLL
    # 4 ln 65 (same total) gives the same bits per character.
    assert bits_per_character(250 * 4 * math.log(65), n) == pytest.approx(math.log2(65))


@pytest.mark.parametrize("fn", [perplexity, bits_per_token])
def test_lm_metrics_reject_bad_nll(fn):
    with pytest.raises(ValueError, match="mean_nll_nats"):
        fn(-0.5)
    with pytest.raises(ValueError, match="mean_nll_nats"):
        fn(float("nan"))


def test_bits_per_character_rejects_bad_inputs():
    with pytest.raises(ValueError, match="num_characters"):
        bits_per_character(10.0, 0)
    with pytest.raises(ValueError, match="num_characters"):
        bits_per_character(10.0, 2.5)
    with pytest.raises(ValueError, match="total_nll_nats"):
        bits_per_character(-1.0, 10)


# ------------------------------------------------------------------------------------------------
# BLEU
# ------------------------------------------------------------------------------------------------

# The example in sacrebleu's README ("Using SacreBLEU from Python"): sacrebleu's layout is a list
# of reference streams; ours is per hypothesis (the transpose).
README_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
README_REF_STREAMS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]
README_REFS_PER_HYP = [list(r) for r in zip(*README_REF_STREAMS)]


def test_bleu_identical_and_disjoint():
    hyps = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert bleu(hyps, hyps) == pytest.approx(100.0)
    assert bleu(hyps, [[h] for h in hyps]) == pytest.approx(100.0)
    assert bleu(["a b c d e"], ["v w x y z"]) == 0.0
    assert sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100)
    assert sentence_bleu("a b c d e", ["v w x y z"]) == 0.0


def test_bleu_hand_example():
    # Single reference, both 6 tokens (brevity penalty 1):
    #   hyp "the cat sat on the mat"  vs  ref "the cat sat on a mat"
    #   1-grams: the(clipped to 1), cat, sat, on, mat           -> 5/6
    #   2-grams: the cat, cat sat, sat on   (not: on the, the mat) -> 3/5
    #   3-grams: the cat sat, cat sat on                         -> 2/4
    #   4-grams: the cat sat on                                  -> 1/3
    #   BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25 ~= 53.73
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    expected = 100 * (1 / 12) ** 0.25
    assert bleu([hyp], [ref]) == pytest.approx(expected)
    assert BLEU().corpus_score([hyp], [[ref]]).score == pytest.approx(expected)


def test_bleu_matches_sacrebleu_readme():
    # sacrebleu README: BLEU().corpus_score(sys, refs) ->
    #   "BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)"
    ours = bleu(README_SYS, README_REFS_PER_HYP)
    assert ours == pytest.approx(BLEU().corpus_score(README_SYS, README_REF_STREAMS).score)
    assert round(ours, 2) == 48.53


def test_bleu_variable_number_of_references():
    # Hypothesis 0 gets one reference, the others two; sacrebleu marks the gap with None.
    refs = [README_REFS_PER_HYP[0][:1]] + README_REFS_PER_HYP[1:]
    streams = [README_REF_STREAMS[0], [None] + README_REF_STREAMS[1][1:]]
    assert bleu(README_SYS, refs) == pytest.approx(
        BLEU().corpus_score(README_SYS, streams).score)


def test_sentence_bleu_matches_sacrebleu():
    expected = BLEU(effective_order=True).sentence_score(README_SYS[2],
                                                         README_REFS_PER_HYP[2]).score
    assert 0 < expected < 100
    assert sentence_bleu(README_SYS[2], README_REFS_PER_HYP[2]) == pytest.approx(expected)


def test_bleu_errors_name_the_argument():
    with pytest.raises(ValueError, match="hypotheses is empty"):
        bleu([], [])
    with pytest.raises(ValueError, match="references has 1 entries but hypotheses has 2"):
        bleu(["a b", "c d"], ["a b"])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        bleu(["a b"], [[]])
    with pytest.raises(ValueError, match="references is empty"):
        sentence_bleu("a b", [])


# ------------------------------------------------------------------------------------------------
# ROUGE
# ------------------------------------------------------------------------------------------------


def test_rouge_hand_example():
    # rouge_score lower-cases and splits on non-alphanumerics; the Porter stemmer leaves these
    # words unchanged ("found", "under" stem to themselves; words of <= 3 letters are not stemmed).
    # Pair 1: hyp "the cat was found under the bed" (7 tokens), ref "the cat was under the bed" (6)
    #   ROUGE-1: overlap the x2, cat, was, under, bed = 6; P = 6/7, R = 6/6; F = 12/13
    #   ROUGE-2: hyp bigrams (6) the cat, cat was, was found, found under, under the, the bed;
    #            ref bigrams (5) the cat, cat was, was under, under the, the bed; overlap 4;
    #            P = 4/6, R = 4/5; F = 2*(2/3)*(4/5) / (2/3 + 4/5) = 8/11
    #   ROUGE-L: the reference is a subsequence of the hypothesis, LCS = 6; F = 12/13
    # Pair 2: hyp "cat the sat", ref "the cat sat"
    #   ROUGE-1: all 3 unigrams match; F = 1
    #   ROUGE-2: {cat the, the sat} vs {the cat, cat sat}: no overlap; F = 0
    #   ROUGE-L: LCS "the sat" (or "cat sat") = 2; P = R = 2/3; F = 2/3
    # Means over the two pairs:
    scores = rouge(["the cat was found under the bed", "cat the sat"],
                   ["the cat was under the bed", "the cat sat"])
    assert set(scores) == {"rouge1", "rouge2", "rougeL"}
    assert scores["rouge1"] == pytest.approx((12 / 13 + 1) / 2)
    assert scores["rouge2"] == pytest.approx((8 / 11 + 0) / 2)
    assert scores["rougeL"] == pytest.approx((12 / 13 + 2 / 3) / 2)


def test_rouge_stemming_and_multiple_references():
    # Porter stemmer: "running" and "runs" both stem to "run", so unigrams match fully.
    assert rouge(["dogs running"], ["dog runs"])["rouge1"] == pytest.approx(1.0)
    # With several references the best one counts.
    best = rouge(["the cat sat"], [["a dog barked", "the cat sat"]])
    assert best == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_rouge_errors():
    with pytest.raises(ValueError, match="hypotheses is empty"):
        rouge([], ["x"])
    with pytest.raises(ValueError, match="references has 2 entries but hypotheses has 1"):
        rouge(["x"], ["x", "y"])
    with pytest.raises(ValueError, match="hypotheses must be a list"):
        rouge("x", ["x"])


# ------------------------------------------------------------------------------------------------
# SQuAD exact match / token F1
# ------------------------------------------------------------------------------------------------


def test_normalize_answer():
    # SQuAD: lower-case, strip punctuation, drop a/an/the, collapse whitespace.
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theme") == "theme"  # articles only as whole words


def test_exact_match():
    hyps = ["The Cat sat.", "a dog", "cat sat on the mat"]
    refs = ["cat sat", "the dog", "cat sat"]
    # Normalised: "cat sat"=="cat sat", "dog"=="dog", "cat sat on mat"!="cat sat" -> 2/3.
    assert exact_match(hyps, refs) == pytest.approx(2 / 3)
    # Verbatim: none of the three strings is identical to its reference.
    assert exact_match(hyps, refs, normalize=False) == 0.0
    assert exact_match(["cat sat"], ["cat sat"], normalize=False) == 1.0
    # Several gold answers: a match with any of them counts.
    assert exact_match(["Paris"], [["London", "paris."]]) == 1.0


def test_token_f1_hand_example():
    # 'The cat sat' -> tokens [cat, sat]; 'cat sat on the mat' -> [cat, sat, on, mat].
    # Common = 2; precision = 2/2 = 1, recall = 2/4 = 1/2; F1 = 2*1*(1/2)/(1 + 1/2) = 2/3.
    assert token_f1("The cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # Bag of tokens (multiset): hyp [cat, cat] vs ref [cat]: common 1; P = 1/2, R = 1; F1 = 2/3.
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("The cat!", "cat") == 1.0
    # Empty after normalisation (SQuAD 2.0 convention): 1 if both empty, else 0.
    assert token_f1("the", "a") == 1.0
    assert token_f1("the", "cat") == 0.0


def test_mean_token_f1():
    # (2/3 + 0 + 1) / 3; the third uses the best of two gold answers.
    hyps = ["The cat sat", "dog", "Paris"]
    refs = ["cat sat on the mat", "cat", ["London", "Paris"]]
    assert mean_token_f1(hyps, refs) == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_squad_errors():
    with pytest.raises(ValueError, match="hypotheses is empty"):
        exact_match([], [])
    with pytest.raises(ValueError, match="references has 1 entries but hypotheses has 2"):
        mean_token_f1(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="references is empty"):
        exact_match(["a"], [])
    with pytest.raises(ValueError, match="hyp must be a string"):
        token_f1(None, "a")
