"""Samplers: DDPM ancestral sampling (Ho et al. 2020) and DDIM (Song et al. 2021).

The single steps follow the equations as ``diffusers``' DDPMScheduler.step and DDIMScheduler.step
write them (tests compare them to 1e-6):
- DDPM: ``x0 = (x_t - sqrt(1-ab_t) eps) / sqrt(ab_t)`` (optionally clipped to [-1, 1]), then the
  posterior mean ``sqrt(ab_prev) beta_t / (1-ab_t) x0 + sqrt(alpha_t) (1-ab_prev) / (1-ab_t) x_t``
  plus ``sigma_t z`` with ``sigma_t^2 = (1-ab_prev) / (1-ab_t) beta_t`` ("fixed_small").
- DDIM: ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z`` with
  ``sigma = eta sqrt((1-ab_prev)/(1-ab_t) (1 - ab_t/ab_prev))``: eta=0 is deterministic, eta=1
  has DDPM's posterior variance. Past the last step ``ab_prev = 1`` (``set_alpha_to_one``).
  With clipping, eps is re-derived from the clipped x0, ``eps = (x_t - sqrt(ab_t) x0) /
  sqrt(1 - ab_t)`` (diffusers' ``use_clipped_model_output=True``; guided-diffusion's
  ``ddim_sample``): keeping the raw eps beside a clipped x0 (diffusers' default) breaks the pair's
  consistency, and on the trained Fashion-MNIST DDPM it dropped DDIM-50's conditional accuracy from
  0.96 to 0.48 (experiments/diffusion/README.md).
  The step subsequence is diffusers' "leading" spacing: ``t_i = i * (T // n)``, descending.

``sample`` runs a whole chain in a ``lax.scan`` (jittable with the sampler settings static);
``denoise(x_t, t) -> model output`` is any function, e.g. a guided U-Net.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion.schedules import Schedule, predict_x0_eps

SAMPLERS = ("ddpm", "ddim")


def ddpm_step(schedule: Schedule, prediction: str, model_out, t, x_t, noise, clip: bool = True):
    """One ancestral step x_t -> x_{t-1} (t a Python or traced int scalar). Returns
    ``(x_prev, x0_hat)``; at t = 0 no noise is added."""
    ab = jnp.asarray(schedule.alphas_cumprod)
    ab_t = ab[t]
    ab_prev = jnp.where(t > 0, ab[jnp.maximum(t - 1, 0)], 1.0)
    alpha_t = ab_t / ab_prev
    beta_t = 1.0 - alpha_t
    x0, _ = predict_x0_eps(schedule, prediction, x_t, t, model_out)
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean = (jnp.sqrt(ab_prev) * beta_t / (1.0 - ab_t)) * x0 + \
        (jnp.sqrt(alpha_t) * (1.0 - ab_prev) / (1.0 - ab_t)) * x_t
    var = jnp.maximum((1.0 - ab_prev) / (1.0 - ab_t) * beta_t, 1e-20)
    x_prev = mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * noise
    return x_prev, x0


def ddim_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """The descending step subsequence ("leading" spacing, as diffusers' default)."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps={num_steps}: expected 1..{num_train_steps} (the schedule's "
                         "training steps)")
    ratio = num_train_steps // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int32)


def ddim_step(schedule: Schedule, prediction: str, model_out, t, t_prev, x_t, eta: float,
              noise=None, clip: bool = True, clipped_eps: bool = True):
    """One DDIM step x_t -> x_{t_prev} (t_prev < 0: the end of the chain, ab_prev = 1).
    ``clipped_eps``: re-derive eps from the (clipped) x0 (diffusers' ``use_clipped_model_output``).
    Returns ``(x_prev, x0_hat)``."""
    ab = jnp.asarray(schedule.alphas_cumprod)
    ab_t = ab[t]
    ab_prev = jnp.where(t_prev >= 0, ab[jnp.maximum(t_prev, 0)], 1.0)
    x0, eps = predict_x0_eps(schedule, prediction, x_t, t, model_out)
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
    if clip and clipped_eps:  # without clipping the two are equal: skip the division by sqrt(1-ab)
        eps = (x_t - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
    var = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
    std = eta * jnp.sqrt(var)
    x_prev = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_prev - std ** 2, 0.0)) * eps
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev, x0


def timesteps_for(sampler: str, schedule: Schedule, steps: int | None) -> np.ndarray:
    if sampler == "ddpm":
        return np.arange(schedule.num_steps - 1, -1, -1, dtype=np.int32)
    if sampler == "ddim":
        return ddim_timesteps(schedule.num_steps, steps or 50)
    raise ValueError(f"sampler={sampler!r}: expected one of {list(SAMPLERS)}")


def sample(denoise: Callable, schedule: Schedule, prediction: str, shape, rng, *,
           sampler: str = "ddim", steps: int | None = 50, eta: float = 0.0, clip: bool = True,
           x_init=None, start_index: int = 0):
    """Run the reverse chain from pure noise of ``shape`` (or from ``x_init`` at the chain's
    ``start_index``-th timestep, for image-to-image). ``denoise(x_t, t[B]) -> model output``.
    Returns x_0 [shape]."""
    ts = timesteps_for(sampler, schedule, steps)[start_index:]
    if len(ts) == 0:
        raise ValueError("start_index leaves no denoising step")
    prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)
    if sampler == "ddpm":
        prev = ts - 1
    rng, init_rng = jax.random.split(rng)
    x = jax.random.normal(init_rng, shape) if x_init is None else x_init
    batch = shape[0]

    def body(x, inputs):
        t, t_prev, key = inputs
        out = denoise(x, jnp.full((batch,), t, jnp.int32))
        noise = jax.random.normal(key, shape)
        if sampler == "ddpm":
            x, _ = ddpm_step(schedule, prediction, out, t, x, noise, clip)
        else:
            x, _ = ddim_step(schedule, prediction, out, t, t_prev, x, eta,
                             noise if eta > 0 else None, clip)
        return x, None

    keys = jax.random.split(rng, len(ts))
    x, _ = jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(prev), keys))
    return x
