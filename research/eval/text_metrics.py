"""Text evaluation metrics for the language-model and seq2seq tasks.

Pure Python/numpy; library-backed where a standard implementation exists so that numbers are
comparable with published ones:

* Language modelling: :func:`perplexity`, :func:`bits_per_token` (from a mean NLL in nats) and
  :func:`bits_per_character` (from a total NLL in nats over a text, to compare models whose
  tokenizers differ).
* Translation: :func:`bleu` (corpus BLEU) and :func:`sentence_bleu`, both via ``sacrebleu`` with
  its default settings (13a tokenization, mixed case, exponential smoothing), on a 0-100 scale.
* Summarisation: :func:`rouge`, ROUGE-1/2/L F-measures via Google's ``rouge_score`` with the
  Porter stemmer, on a 0-1 scale.
* Question answering: :func:`exact_match`, :func:`token_f1` and :func:`mean_token_f1` with SQuAD's
  answer normalisation (lower-case, drop punctuation and the articles a/an/the, collapse
  whitespace), on a 0-1 scale.

References for the list-valued metrics are given per hypothesis: either one string per
hypothesis (``list[str]``) or a list of alternative references per hypothesis
(``list[list[str]]``, ``references[i]`` being the references of ``hypotheses[i]``). Note that this
is the transpose of sacrebleu's own layout (a list of reference *streams*); :func:`bleu` converts.
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Sequence, Union

import numpy as np

References = Union[Sequence[str], Sequence[Sequence[str]]]

__all__ = [
    "bits_per_character",
    "bits_per_token",
    "bleu",
    "exact_match",
    "mean_token_f1",
    "normalize_answer",
    "perplexity",
    "rouge",
    "sentence_bleu",
    "token_f1",
]

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------

def _check_nll(value, name: str) -> float:
    try:
        v = float(np.asarray(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a real scalar, got {value!r}") from e
    if math.isnan(v):
        raise ValueError(f"{name} is NaN")
    if v < 0:
        raise ValueError(f"{name} must be >= 0 (a negative log-likelihood in nats), got {v}")
    return v


def _check_texts(texts, name: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a list of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(t).__name__}")
    return texts


def _check_refs(references, n: int, name: str = "references") -> list[list[str]]:
    """Per-hypothesis references as ``list[list[str]]`` (each inner list non-empty)."""
    if isinstance(references, str):
        raise ValueError(f"{name} must be a list (one entry per hypothesis), not a single string")
    references = list(references)
    if not references:
        raise ValueError(f"{name} is empty")
    if len(references) != n:
        raise ValueError(f"{name} has {len(references)} entries but hypotheses has {n}: "
                         "give one reference (or one list of references) per hypothesis")
    out = []
    for i, r in enumerate(references):
        if isinstance(r, str):
            out.append([r])
            continue
        r = list(r)
        if not r:
            raise ValueError(f"{name}[{i}] is an empty list of references")
        for j, s in enumerate(r):
            if not isinstance(s, str):
                raise ValueError(f"{name}[{i}][{j}] must be a string, got {type(s).__name__}")
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------
# Language modelling
# ----------------------------------------------------------------------------------------------

def perplexity(mean_nll_nats) -> float:
    """Perplexity ``exp(mean NLL)`` from a mean per-token negative log-likelihood in nats.

    Returns ``inf`` when the exponential overflows.
    """
    v = _check_nll(mean_nll_nats, "mean_nll_nats")
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def bits_per_token(mean_nll_nats) -> float:
    """Mean per-token NLL in bits: ``mean_nll_nats / ln 2`` (``log2`` of the perplexity)."""
    return _check_nll(mean_nll_nats, "mean_nll_nats") / _LN2


def bits_per_character(total_nll_nats, num_characters: int) -> float:
    """Bits per character: total NLL of a text in nats, divided by ``ln 2`` and its length in
    characters. Independent of the tokenizer, so it compares models with different vocabularies
    (``num_characters`` must count the characters of the *same* text the NLL was summed over)."""
    total = _check_nll(total_nll_nats, "total_nll_nats")
    if isinstance(num_characters, bool) or not float(num_characters).is_integer():
        raise ValueError(f"num_characters must be a positive integer, got {num_characters!r}")
    if num_characters <= 0:
        raise ValueError(f"num_characters must be positive, got {num_characters}")
    return total / _LN2 / int(num_characters)


# ----------------------------------------------------------------------------------------------
# BLEU (sacrebleu)
# ----------------------------------------------------------------------------------------------

def bleu(hypotheses: Sequence[str], references: References) -> float:
    """Corpus BLEU (0-100) via ``sacrebleu.corpus_bleu`` with sacrebleu's defaults.

    ``references`` is one string per hypothesis, or one list of references per hypothesis (the
    counts may differ between hypotheses). Sentences shorter than four tokens contribute no
    4-grams, so a corpus of only such sentences scores 0 even when identical to the references,
    as with sacrebleu itself.
    """
    import sacrebleu

    hyps = _check_texts(hypotheses, "hypotheses")
    refs = _check_refs(references, len(hyps))
    n_streams = max(len(r) for r in refs)
    # sacrebleu wants reference streams: streams[k][i] is the k-th reference of hypothesis i;
    # None marks a missing reference when hypotheses have different numbers of them.
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    return float(sacrebleu.corpus_bleu(hyps, streams).score)


def sentence_bleu(hypothesis: str, references: Union[str, Sequence[str]]) -> float:
    """Sentence BLEU (0-100) of one hypothesis via ``sacrebleu.sentence_bleu`` (sacrebleu's
    defaults, which include effective n-gram order and exponential smoothing)."""
    import sacrebleu

    if not isinstance(hypothesis, str):
        raise ValueError(f"hypothesis must be a string, got {type(hypothesis).__name__}")
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("references is empty")
    for j, s in enumerate(refs):
        if not isinstance(s, str):
            raise ValueError(f"references[{j}] must be a string, got {type(s).__name__}")
    return float(sacrebleu.sentence_bleu(hypothesis, refs).score)


# ----------------------------------------------------------------------------------------------
# ROUGE (rouge_score)
# ----------------------------------------------------------------------------------------------

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: References) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0-1), each the mean over hypothesis/reference
    pairs, via ``rouge_score.rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'],
    use_stemmer=True)``. With several references per hypothesis the best one counts
    (``RougeScorer.score_multi``). Returns ``{'rouge1': ..., 'rouge2': ..., 'rougeL': ...}``.
    """
    from rouge_score import rouge_scorer

    hyps = _check_texts(hypotheses, "hypotheses")
    refs = _check_refs(references, len(hyps))
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for h, r in zip(hyps, refs):
        scores = scorer.score(r[0], h) if len(r) == 1 else scorer.score_multi(r, h)
        for k in _ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: v / len(hyps) for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------
# SQuAD exact match / token F1
# ----------------------------------------------------------------------------------------------

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalisation: lower-case, remove punctuation, remove the articles
    a/an/the, collapse whitespace (in that order, as in the official evaluation script)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(hypotheses: Sequence[str], references: References,
                normalize: bool = True) -> float:
    """Fraction (0-1) of hypotheses equal to a reference (the best of several, if given),
    after SQuAD normalisation when ``normalize`` (else compared verbatim)."""
    hyps = _check_texts(hypotheses, "hypotheses")
    refs = _check_refs(references, len(hyps))
    norm = normalize_answer if normalize else (lambda s: s)
    hits = [max(float(norm(h) == norm(r)) for r in rs) for h, rs in zip(hyps, refs)]
    return float(np.mean(hits))


def token_f1(hyp: str, ref: str) -> float:
    """SQuAD token F1 (0-1) of one answer: harmonic mean of precision and recall of the
    bag-of-tokens overlap after normalisation. If either side normalises to no tokens the score
    is 1 when both do and 0 otherwise (the SQuAD 2.0 script's convention)."""
    if not isinstance(hyp, str):
        raise ValueError(f"hyp must be a string, got {type(hyp).__name__}")
    if not isinstance(ref, str):
        raise ValueError(f"ref must be a string, got {type(ref).__name__}")
    hyp_toks = normalize_answer(hyp).split()
    ref_toks = normalize_answer(ref).split()
    if not hyp_toks or not ref_toks:
        return float(hyp_toks == ref_toks)
    common = collections.Counter(hyp_toks) & collections.Counter(ref_toks)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(hyp_toks)
    recall = num_same / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


def mean_token_f1(hypotheses: Sequence[str], references: References) -> float:
    """Mean over hypotheses of :func:`token_f1`, taking the best reference when several."""
    hyps = _check_texts(hypotheses, "hypotheses")
    refs = _check_refs(references, len(hyps))
    return float(np.mean([max(token_f1(h, r) for r in rs) for h, rs in zip(hyps, refs)]))
