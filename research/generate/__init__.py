"""Text generation: logit filters (temperature, top-k, top-p), token sampling, KV-cached
autoregressive ``generate`` and beam search for ``research.models.transformer.Decoder``."""
from research.generate.beam import beam_search
from research.generate.sampling import (
    apply_temperature,
    generate,
    sample_token,
    top_k_filter,
    top_p_filter,
)

__all__ = ["apply_temperature", "beam_search", "generate", "sample_token", "top_k_filter",
           "top_p_filter"]
