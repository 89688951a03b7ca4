"""Reusable Flax Linen building blocks, used only through pure init/apply."""
