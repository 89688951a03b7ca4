"""Noise schedules and the forward process of DDPM (Ho et al. 2020).

A ``Schedule`` holds ``betas`` and ``alphas_cumprod`` (alpha-bar) for ``T`` training steps:
- ``linear``: betas evenly spaced from ``beta_start`` to ``beta_end`` (DDPM: 1e-4 .. 0.02);
- ``cosine``: Nichol & Dhariwal 2021, ``alpha_bar(t) = cos((t/T + s) / (1 + s) * pi/2)^2`` with
  ``s = 0.008`` and each beta capped at 0.999 (``diffusers``' ``squaredcos_cap_v2``).

The forward process ``q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)`` and the model targets:
epsilon (the noise) or v (Salimans & Ho 2022: ``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0``).
Betas are computed in float64 and stored as float32, alpha-bar is a float32 running product (tests
compare both, and the forward process, with ``diffusers``' DDPMScheduler to 1e-6).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v")


@dataclasses.dataclass(frozen=True)
class Schedule:
    betas: np.ndarray            # [T] float32
    alphas_cumprod: np.ndarray   # [T] float32, alpha-bar_t = prod_{s<=t} (1 - beta_s)

    @property
    def num_steps(self) -> int:
        return len(self.betas)


def make_schedule(kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, cosine_s: float = 0.008) -> Schedule:
    if kind not in KINDS:
        raise ValueError(f"Noise schedule {kind!r}: expected one of {list(KINDS)}")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"Noise schedule num_steps={num_steps!r}: expected an int >= 2")
    if kind == "linear":
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"Linear schedule needs 0 < beta_start < beta_end < 1, got "
                             f"{beta_start}, {beta_end}")
        # diffusers builds torch.linspace in float32; numpy's float32 linspace agrees to ~1e-9.
        betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float32)
    else:
        def alpha_bar(t):
            return math.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
                          for i in range(num_steps)], np.float64).astype(np.float32)
    # A float32 running product, as torch.cumprod in diffusers: near t = 0, 1 - alpha-bar cancels
    # and float64 products would differ from diffusers' by ~1e-5 after the sqrt.
    alphas_cumprod = np.cumprod(np.float32(1.0) - betas, dtype=np.float32)
    return Schedule(betas=betas, alphas_cumprod=alphas_cumprod)


def _bcast(values: jax.Array, x: jax.Array) -> jax.Array:
    """[B] per-example values -> broadcastable against x [B, ...]."""
    return jnp.reshape(values, values.shape + (1,) * (x.ndim - values.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample of q(x_t | x_0): ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`` (t: [B] ints in [0, T))."""
    ab = _bcast(jnp.asarray(schedule.alphas_cumprod)[t], x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def velocity(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """The v-prediction target ``sqrt(ab_t) noise - sqrt(1 - ab_t) x0``."""
    ab = _bcast(jnp.asarray(schedule.alphas_cumprod)[t], x0)
    return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0


def target(schedule: Schedule, prediction: str, x0, t, noise) -> jax.Array:
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        return velocity(schedule, x0, t, noise)
    raise ValueError(f"prediction={prediction!r}: expected one of {list(PREDICTIONS)}")


def predict_x0_eps(schedule: Schedule, prediction: str, x_t, t, model_out):
    """``(x0_hat, eps_hat)`` from the model output (epsilon or v) at x_t, step t ([B] or scalar)."""
    ab = jnp.asarray(schedule.alphas_cumprod)[t]
    ab = _bcast(ab, x_t) if jnp.ndim(ab) else ab
    sa, sb = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    if prediction == "epsilon":
        return (x_t - sb * model_out) / sa, model_out
    if prediction == "v":
        return sa * x_t - sb * model_out, sa * model_out + sb * x_t
    raise ValueError(f"prediction={prediction!r}: expected one of {list(PREDICTIONS)}")


def diffusion_loss(schedule: Schedule, prediction: str, apply_fn, x0: jax.Array, rng: jax.Array):
    """Mean squared error of the model's prediction (``apply_fn(x_t, t) -> [B, ...]``) against the
    epsilon or v target, at t uniform in [0, T) and Gaussian noise. Returns ``(loss, t)``."""
    t_rng, n_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_steps)
    noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    out = apply_fn(x_t, t)
    err = jnp.square(out.astype(jnp.float32) - target(schedule, prediction, x0, t, noise))
    return err.mean(), t
