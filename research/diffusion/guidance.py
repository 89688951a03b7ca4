"""Guidance for conditional sampling.

Classifier-free guidance (Ho & Salimans 2022): one model is trained with its condition replaced by
a "null" condition a fraction ``p_uncond`` of the time (10% here); at sampling
``eps = eps(x, null) + w (eps(x, c) - eps(x, null))``: w = 0 is unconditional, w = 1 the plain
conditional model, w > 1 trades diversity for fidelity (diffusers' ``guidance_scale`` convention).
The guided model output is the same combination for v-prediction (it is linear in the output).

Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 for DDIM): with a noise-aware classifier
``log p(y | x_t, t)``, ``eps' = eps - s sqrt(1 - ab_t) grad_x log p(y | x_t, t)``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from research.diffusion.schedules import Schedule

MAX_GUIDANCE = 20.0


def check_guidance_scale(scale: float, name: str = "guidance scale") -> float:
    if not isinstance(scale, (int, float)) or not 0.0 <= float(scale) <= MAX_GUIDANCE:
        raise ValueError(f"{name}={scale!r} is out of range: expected 0 <= w <= {MAX_GUIDANCE:g} "
                         "(0 = unconditional, 1 = conditional, ~3 = typical guidance)")
    return float(scale)


def drop_condition(labels: jax.Array, rng: jax.Array, p_uncond: float, null_id: int) -> jax.Array:
    """Replace each label by ``null_id`` with probability ``p_uncond`` (training-time dropout)."""
    drop = jax.random.bernoulli(rng, p_uncond, labels.shape)
    return jnp.where(drop, null_id, labels)


def cfg_combine(out_cond: jax.Array, out_uncond: jax.Array, scale) -> jax.Array:
    return out_uncond + scale * (out_cond - out_uncond)


def classifier_free(apply_fn: Callable, labels: jax.Array, null_id: int, scale: float) -> Callable:
    """``denoise(x, t)`` for the samplers: one batched call of ``apply_fn(x, t, labels)`` on
    [x; x] with [labels; null] when guidance is on (scale != 1), a single call otherwise."""

    def denoise(x, t):
        if scale == 1.0:
            return apply_fn(x, t, labels)
        out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([labels, jnp.full_like(labels, null_id)]))
        cond, uncond = jnp.split(out, 2)
        return cfg_combine(cond, uncond, scale)

    return denoise


def classifier_guided(denoise: Callable, log_prob_fn: Callable, schedule: Schedule,
                      labels: jax.Array, scale: float, prediction: str = "epsilon") -> Callable:
    """Wrap an epsilon-predicting ``denoise(x, t)`` with classifier guidance.
    ``log_prob_fn(x_t, t) -> [B, num_classes]`` log-probabilities of a noise-aware classifier."""
    if prediction != "epsilon":
        raise ValueError("classifier guidance is implemented for epsilon-prediction models")

    def guided(x, t):
        eps = denoise(x, t)

        def selected(x_):
            logp = log_prob_fn(x_, t)
            return jnp.take_along_axis(logp, labels[:, None], axis=-1).sum()

        grad = jax.grad(selected)(x)
        ab = jnp.asarray(schedule.alphas_cumprod)[t].reshape((-1,) + (1,) * (x.ndim - 1))
        return eps - scale * jnp.sqrt(1.0 - ab) * grad

    return guided
