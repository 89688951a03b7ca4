"""Evaluation metrics: perplexity and bits per token/character for language models; corpus and
sentence BLEU (sacrebleu), ROUGE-1/2/L (rouge_score) and SQuAD exact match / token F1 for
seq2seq tasks. See ``research.eval.text_metrics``."""
from research.eval.text_metrics import (
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

__all__ = ["bits_per_character", "bits_per_token", "bleu", "exact_match", "mean_token_f1",
           "normalize_answer", "perplexity", "rouge", "sentence_bleu", "token_f1"]
