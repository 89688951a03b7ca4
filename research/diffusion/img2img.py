"""Image-to-image (SDEdit, Meng et al. 2022), as diffusers' img2img pipelines do it.

With ``n`` DDIM steps and ``strength`` s in (0, 1]: skip the first ``n - int(n s)`` steps of the
chain, noise the input to the first remaining timestep t with q(x_t | x_0), and denoise from there
(with the target label and guidance). s = 1 starts from (almost) pure noise; small s keeps the
input's layout. A latent model (``task.encode``) does this in its latent space and decodes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion import samplers, schedules


def check_strength(strength: float, steps: int) -> int:
    """-> the number of denoising steps ``int(steps * strength)`` (>= 1), or ValueError."""
    if not isinstance(strength, (int, float)) or not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength={strength!r} is out of range: expected 0 < strength <= 1")
    n = min(int(steps * strength), steps)
    if n < 1:
        raise ValueError(f"strength={strength} with {steps} steps leaves no denoising step: use a "
                         f"strength >= {1 / steps:g} or more steps")
    return n


def sdedit(task, params, images, labels, rng, *, strength: float = 0.5, steps: int = 50,
           guidance_scale: float = 3.0, eta: float = 0.0):
    """Images [N, H, W, C] in [-1, 1] -> edited images toward ``labels`` (a ddpm or ldm task)."""
    n = check_strength(strength, steps)
    start_index = steps - n
    t_start = int(samplers.ddim_timesteps(task.schedule.num_steps, steps)[start_index])
    x0 = task.encode(params, images) if hasattr(task, "encode") else jnp.asarray(images)
    noise_rng, rng = jax.random.split(rng)
    t = jnp.full((x0.shape[0],), t_start, jnp.int32)
    x_t = schedules.q_sample(task.schedule, x0, t, jax.random.normal(noise_rng, x0.shape))
    return task.sample(params, labels, rng, sampler="ddim", steps=steps,
                       guidance_scale=guidance_scale, eta=eta, x_init=np.asarray(x_t),
                       start_index=start_index)
