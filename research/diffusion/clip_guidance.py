"""CLIP guidance (GLIDE, Nichol et al. 2022, Sec. 2.4), on a CLIP trained on *clean* images.

GLIDE steers sampling with the gradient of the image-text dot product ``f(x_t, t) . g(c)`` of a
*noise-aware* CLIP (one trained on noised images x_t). Written for DDIM as classifier guidance is
(Dhariwal & Nichol 2021, Algorithm 2; ``research.diffusion.guidance.classifier_guided``):

    eps'(x_t, t) = eps(x_t, t) - s sqrt(1 - ab_t) grad_{x_t} cos(f(x_t, t), g(c)).

Our CLIP (``research.tasks.clip``) was trained on clean Fashion-MNIST images only, so this module
implements the common variant for a clean-image CLIP: **CLIP looks at the model's predicted clean
image** ``x0_hat(x_t) = (x_t - sqrt(1 - ab_t) eps(x_t, t)) / sqrt(ab_t)`` (for a v-model the same
x0_hat, ``sqrt(ab_t) x_t - sqrt(1 - ab_t) v``), not at the noisy x_t:

    eps'(x_t, t) = eps(x_t, t) - s sqrt(1 - ab_t) grad_{x_t} cos(E(x0_hat(x_t)), g(c))

with ``E = image_embed_fn`` (images in the diffusion model's range [-1, 1]) and ``g(c)`` the text
embedding; the cosine normalises both, so any embedder works. x0_hat is not clipped to [-1, 1]
before CLIP (clipping would zero the gradient of saturated pixels).

The gradient through eps. x0_hat depends on x_t directly and through eps(x_t, t).
``grad_through_eps=False`` (the default, the usual cheap choice) stops the gradient at the model
output: ``grad = (1 / sqrt(ab_t)) J_E^T d cos / dE``, one CLIP backward pass and no backward pass
through the U-Net. ``grad_through_eps=True`` back-propagates through the denoiser as well (one
U-Net forward + backward per step; the model output returned is the one of that same forward pass).

For a v-prediction model the same eps shift is returned as a v shift: at fixed x_t,
``eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t``, so ``dv = d eps / sqrt(ab_t)``.

The image embedder must treat examples independently (no batch statistics): the gradient of the
batch's summed cosine is then each example's own gradient.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from research.diffusion.schedules import PREDICTIONS, Schedule, predict_x0_eps

MAX_CLIP_GUIDANCE = 1000.0


def check_clip_guidance_scale(scale: float, name: str = "CLIP guidance scale") -> float:
    """``scale`` as a float, or ValueError naming ``name`` and the range."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(
            float(scale)) or not 0.0 <= float(scale) <= MAX_CLIP_GUIDANCE:
        raise ValueError(f"{name}={scale!r} is out of range: expected 0 <= s <= "
                         f"{MAX_CLIP_GUIDANCE:g} (0 = no CLIP guidance; the predicted clean image "
                         "moves by s (1 - ab_t) / ab_t times the cosine's gradient, so try 1..100)")
    return float(scale)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    a = a.astype(jnp.float32)
    b = jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape)
    na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, -1), 1e-24))
    nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, -1), 1e-24))
    return jnp.sum(a * b, -1) / (na * nb)


def clip_guided(denoise: Callable, image_embed_fn: Callable, text_embed, schedule: Schedule,
                scale: float, prediction: str = "epsilon", grad_through_eps: bool = False
                ) -> Callable:
    """Wrap a sampler's ``denoise(x_t, t) -> model output`` with CLIP guidance on x0_hat.

    ``image_embed_fn(images [B, H, W, C] in [-1, 1]) -> [B, D]`` (differentiable);
    ``text_embed``: [B, D] (one per example) or [D] (one for all); ``scale``: s >= 0 (0 returns
    ``denoise`` itself); ``prediction``: what ``denoise`` outputs, 'epsilon' or 'v'.
    """
    scale = check_clip_guidance_scale(scale)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}: expected one of {list(PREDICTIONS)}")
    if scale == 0.0:
        return denoise
    text_embed = jnp.asarray(text_embed, jnp.float32)
    alphas_cumprod = jnp.asarray(schedule.alphas_cumprod)

    def guided(x, t):
        def objective(x_):
            out = denoise(x_, t)
            if not grad_through_eps:
                out = jax.lax.stop_gradient(out)
            x0, _ = predict_x0_eps(schedule, prediction, x_, t, out)
            return jnp.sum(_cosine(image_embed_fn(x0), text_embed)), out

        grad, out = jax.grad(objective, has_aux=True)(x)
        ab = alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
        shift = scale * jnp.sqrt(1.0 - ab) * grad          # the eps shift
        if prediction == "v":
            shift = shift / jnp.sqrt(ab)
        return (out - shift).astype(out.dtype)

    return guided
