"""Text generation: logit filters (temperature, top-k, top-p), token sampling, and KV-cached
autoregressive ``generate`` for ``research.models.transformer.Decoder``."""
from research.generate.sampling import (
    apply_temperature,
    generate,
    sample_token,
    top_k_filter,
    top_p_filter,
)

__all__ = ["apply_temperature", "generate", "sample_token", "top_k_filter", "top_p_filter"]
