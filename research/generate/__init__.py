"""Text generation: logit filters (temperature, top-k, top-p), token sampling, KV-cached
autoregressive ``generate`` and beam search for ``research.models.transformer.Decoder``; greedy
and beam search for the encoder-decoder (``seq2seq_greedy``, ``seq2seq_beam_search``)."""
from research.generate.beam import beam_search
from research.generate.sampling import (
    apply_temperature,
    generate,
    sample_token,
    top_k_filter,
    top_p_filter,
)
# Encoder-decoder (research.models.seq2seq.EncoderDecoder): greedy and beam search from a source.
from research.generate.seq2seq import beam_search as seq2seq_beam_search
from research.generate.seq2seq import greedy as seq2seq_greedy

__all__ = ["apply_temperature", "beam_search", "generate", "sample_token", "seq2seq_beam_search",
           "seq2seq_greedy", "top_k_filter", "top_p_filter"]
