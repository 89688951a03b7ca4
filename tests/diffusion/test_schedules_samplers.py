"""Schedules, the forward process and single sampler steps against ``diffusers`` (reference:
diffusers' DDPMScheduler / DDIMScheduler on torch CPU), to 1e-6; DDIM's eta limits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.diffusion import samplers, schedules

diffusers = pytest.importorskip("diffusers", reason="diffusers is a [dev] dependency")
torch = pytest.importorskip("torch")

DIFFUSERS_KIND = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SHAPE = (2, 4, 4, 1)


def _ref(cls, kind, prediction="epsilon", clip=True):
    return cls(num_train_timesteps=1000, beta_schedule=DIFFUSERS_KIND[kind],
               prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[prediction],
               clip_sample=clip)


def _np(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_and_forward_process_match_diffusers(kind):
    ours = schedules.make_schedule(kind, 1000)
    ref = _ref(diffusers.DDPMScheduler, kind)
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6, rtol=0)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal(SHAPE, np.float32), rng.standard_normal(SHAPE, np.float32)
    t = np.array([3, 917], np.int32)
    xt = schedules.q_sample(ours, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    ref_xt = ref.add_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor(t, dtype=torch.long))
    np.testing.assert_allclose(_np(xt), ref_xt.numpy(), atol=1e-6)
    v = schedules.velocity(ours, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    ref_v = ref.get_velocity(torch.tensor(x0), torch.tensor(noise), torch.tensor(t, dtype=torch.long))
    np.testing.assert_allclose(_np(v), ref_v.numpy(), atol=1e-6)


@pytest.mark.parametrize("kind,prediction,clip,t", [
    ("linear", "epsilon", True, 500), ("linear", "epsilon", False, 1), ("cosine", "v", True, 999),
    ("linear", "epsilon", True, 0)])
def test_ddpm_step_matches_diffusers(kind, prediction, clip, t):
    ours = schedules.make_schedule(kind, 1000)
    ref = _ref(diffusers.DDPMScheduler, kind, prediction, clip)
    rng = np.random.default_rng(t)
    x, out = rng.standard_normal(SHAPE, np.float32), rng.standard_normal(SHAPE, np.float32)
    gen = torch.Generator().manual_seed(7)
    res = ref.step(torch.tensor(out), t, torch.tensor(x), generator=gen)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).numpy()  # diffusers' draw
    prev, x0 = samplers.ddpm_step(ours, prediction, jnp.asarray(out), t, jnp.asarray(x),
                                  jnp.asarray(noise), clip)
    np.testing.assert_allclose(_np(x0), res.pred_original_sample.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(prev), res.prev_sample.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,prediction,eta,clip,index,clipped_eps", [
    ("linear", "epsilon", 0.0, True, 10, True), ("linear", "epsilon", 0.0, True, 10, False),
    ("linear", "epsilon", 1.0, False, 3, True), ("cosine", "v", 0.5, True, 0, True),
    ("cosine", "epsilon", 0.0, True, 0, True), ("cosine", "v", 0.5, True, 0, False),
    ("linear", "epsilon", 0.0, False, 49, False)])
def test_ddim_step_and_timesteps_match_diffusers(kind, prediction, eta, clip, index, clipped_eps):
    """``clipped_eps`` is diffusers' ``use_clipped_model_output`` (our default on: eps re-derived
    from the clipped x0); both settings match."""
    ours = schedules.make_schedule(kind, 1000)
    ref = _ref(diffusers.DDIMScheduler, kind, prediction, clip)
    ref.set_timesteps(50)
    ts = samplers.ddim_timesteps(1000, 50)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    t = int(ts[index])
    t_prev = int(ts[index + 1]) if index + 1 < len(ts) else -1
    rng = np.random.default_rng(index)
    x, out = rng.standard_normal(SHAPE, np.float32), rng.standard_normal(SHAPE, np.float32)
    res = ref.step(torch.tensor(out), t, torch.tensor(x), eta=eta,
                   use_clipped_model_output=clipped_eps, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)).numpy()
    prev, x0 = samplers.ddim_step(ours, prediction, jnp.asarray(out), t, t_prev, jnp.asarray(x),
                                  eta, jnp.asarray(noise), clip, clipped_eps)
    np.testing.assert_allclose(_np(x0), res.pred_original_sample.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(prev), res.prev_sample.numpy(), rtol=1e-6, atol=1e-6)


def test_ddim_clipped_eps_keeps_x_prev_consistent_with_x0():
    """With x0 clipped, re-deriving eps keeps (x0, eps) a decomposition of x_t
    (x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps) and, at t_prev = t, returns x_t itself; the raw
    eps does not (closed form: the forward process's own identity)."""
    s = schedules.make_schedule("cosine", 1000)
    rng = np.random.default_rng(0)
    x, out = (jnp.asarray(3.0 * rng.standard_normal(SHAPE, np.float32)) for _ in range(2))
    t = 980
    same, x0 = samplers.ddim_step(s, "epsilon", out, t, t, x, 0.0)
    assert float(jnp.abs(x0).max()) <= 1.0
    np.testing.assert_allclose(_np(same), _np(x), rtol=1e-4, atol=1e-4)
    raw, _ = samplers.ddim_step(s, "epsilon", out, t, t, x, 0.0, clipped_eps=False)
    assert np.abs(_np(raw) - _np(x)).max() > 0.1


def test_ddim_eta1_full_steps_is_ddpm_step():
    """DDIM with eta=1 on every training step has DDPM's posterior mean and variance (no clip:
    the identity holds when x0 and eps come from the same model output). Relative 2e-4: in float32
    the two formulas round differently where 1 - alpha-bar cancels near t = 1."""
    s = schedules.make_schedule("linear", 1000)
    rng = np.random.default_rng(1)
    x, out, z = (jnp.asarray(rng.standard_normal(SHAPE, np.float32)) for _ in range(3))
    for t in (1, 400, 999):
        a, _ = samplers.ddim_step(s, "epsilon", out, t, t - 1, x, 1.0, z, clip=False)
        b, _ = samplers.ddpm_step(s, "epsilon", out, t, x, z, clip=False)
        np.testing.assert_allclose(_np(a), _np(b), rtol=2e-4, atol=1e-6)


def test_ddim_eta0_is_deterministic_and_eta_adds_noise():
    s = schedules.make_schedule("cosine", 100)
    denoise = lambda x, t: 0.1 * x  # noqa: E731 - any fixed model
    run = jax.jit(lambda rng, eta: samplers.sample(denoise, s, "epsilon", SHAPE, rng,
                                                   sampler="ddim", steps=10, eta=eta),
                  static_argnums=1)
    x0 = jax.random.normal(jax.random.key(0), SHAPE)
    a = samplers.sample(denoise, s, "epsilon", SHAPE, jax.random.key(1), steps=10, x_init=x0)
    b = samplers.sample(denoise, s, "epsilon", SHAPE, jax.random.key(2), steps=10, x_init=x0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same start, other rng: equal
    c = samplers.sample(denoise, s, "epsilon", SHAPE, jax.random.key(1), steps=10, x_init=x0, eta=1.0)
    d = samplers.sample(denoise, s, "epsilon", SHAPE, jax.random.key(2), steps=10, x_init=x0, eta=1.0)
    assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3
    assert run(jax.random.key(0), 0.0).shape == SHAPE


def test_bad_step_counts_raise():
    with pytest.raises(ValueError, match="num_steps=0"):
        samplers.ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="expected one of"):
        schedules.make_schedule("quadratic")
