"""Converters between this codebase's model parameters and other formats (Hugging Face
``transformers`` checkpoints)."""
