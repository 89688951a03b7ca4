"""Classifier-free guidance (Ho & Salimans 2022, eq. 6 in diffusers' convention) and classifier
guidance (Dhariwal & Nichol 2021, Algorithm 2): the formulas against hand-computed values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.diffusion import guidance, schedules


def test_cfg_formula_and_batched_denoiser():
    cond, uncond = jnp.array([2.0, -1.0]), jnp.array([0.5, 1.0])
    np.testing.assert_allclose(guidance.cfg_combine(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(guidance.cfg_combine(cond, uncond, 1.0), cond)
    np.testing.assert_allclose(guidance.cfg_combine(cond, uncond, 3.0), [0.5 + 3 * 1.5, 1.0 - 6.0])
    # a "model" whose output depends on the label: x * (label + 1) + t
    apply_fn = lambda x, t, y: x * (y[:, None] + 1.0) + t[:, None]  # noqa: E731
    labels, null = jnp.array([2, 5]), 10
    x, t = jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([7, 8])
    w = 2.5
    got = guidance.classifier_free(apply_fn, labels, null, w)(x, t)
    c, u = apply_fn(x, t, labels), apply_fn(x, t, jnp.full((2,), null))
    np.testing.assert_allclose(got, u + w * (c - u), rtol=1e-6)
    np.testing.assert_allclose(guidance.classifier_free(apply_fn, labels, null, 1.0)(x, t), c)


def test_condition_dropout_rate():
    labels = jnp.zeros((20000,), jnp.int32)
    dropped = guidance.drop_condition(labels, jax.random.key(0), 0.1, 10)
    frac = float(jnp.mean(dropped == 10))
    assert 0.09 < frac < 0.11, frac
    assert set(np.unique(np.asarray(dropped))) == {0, 10}


def test_classifier_guidance_shifts_eps_by_the_log_prob_gradient():
    """For a linear-softmax classifier log p(y|x) = (Wx)_y - logsumexp(Wx), the gradient is
    W_y - sum_k p_k W_k; guided eps = eps - s sqrt(1 - ab_t) grad."""
    s = schedules.make_schedule("linear", 100)
    W = jax.random.normal(jax.random.key(0), (3, 4))
    log_prob = lambda x, t: jax.nn.log_softmax(x.reshape(x.shape[0], -1) @ W.T)  # noqa: E731
    denoise = lambda x, t: 0.5 * x  # noqa: E731
    x = jax.random.normal(jax.random.key(1), (2, 2, 2, 1))
    t, labels, scale = jnp.array([10, 90]), jnp.array([0, 2]), 2.0
    got = guidance.classifier_guided(denoise, log_prob, s, labels, scale)(x, t)
    flat = np.asarray(x).reshape(2, 4)
    p = np.asarray(jax.nn.softmax(flat @ np.asarray(W).T))
    grad = np.asarray(W)[np.asarray(labels)] - p @ np.asarray(W)
    ab = s.alphas_cumprod[np.asarray(t)][:, None]
    want = 0.5 * flat - scale * np.sqrt(1 - ab) * grad
    np.testing.assert_allclose(np.asarray(got).reshape(2, 4), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.5, 21.0, float("nan")])
def test_guidance_scale_out_of_range(bad):
    with pytest.raises(ValueError, match=r"guidance scale=.* is out of range: expected 0 <= w <= 20"):
        guidance.check_guidance_scale(bad)
