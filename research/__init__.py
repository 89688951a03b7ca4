"""A JAX/Flax research codebase for language and generative models."""
