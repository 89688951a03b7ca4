"""The alignment objectives against closed forms and a plain NumPy loop.

References: DPO, Rafailov et al. 2023 eq. 7 and IPO, Azar et al. 2023 eq. 17 (hand-computed values
with ``math``); Bradley-Terry NLL ``log(1 + exp(-(r_c - r_r)))``; GAE, Schulman et al. 2016 eq. 16
as a straightforward backwards NumPy loop; PPO-clip, Schulman et al. 2017 eq. 7.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.rlhf import losses


def test_dpo_loss_hand_computed():
    # h = (pi_c - ref_c) - (pi_r - ref_r) = (-1 + 1.5) - (-2 + 1.5) = 1.0; beta = 0.5
    args = [jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5])]
    loss, rc, rr = losses.dpo_loss(*args, beta=0.5)
    assert float(loss[0]) == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    assert float(rc[0]) == pytest.approx(0.25) and float(rr[0]) == pytest.approx(-0.25)
    # IPO: (h - 1 / (2 beta))^2 = (1 - 1)^2 = 0; with beta = 0.25: (1 - 2)^2 = 1
    assert float(losses.dpo_loss(*args, beta=0.5, kind="ipo")[0][0]) == pytest.approx(0.0, abs=1e-7)
    assert float(losses.dpo_loss(*args, beta=0.25, kind="ipo")[0][0]) == pytest.approx(1.0)
    # conservative DPO, e = 0.1: -(0.9) log s(0.5) - 0.1 log s(-0.5)
    want = 0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5))
    assert float(losses.dpo_loss(*args, beta=0.5, label_smoothing=0.1)[0][0]) == pytest.approx(want)


def test_dpo_loss_is_log2_when_policy_is_reference():
    rng = np.random.default_rng(0)
    c, r = jnp.asarray(rng.normal(size=8) * 10), jnp.asarray(rng.normal(size=8) * 10)
    loss, rc, rr = losses.dpo_loss(c, r, c, r, beta=0.1)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    np.testing.assert_allclose(rc, 0.0) and np.testing.assert_allclose(rr, 0.0)


def test_bradley_terry_known_pair():
    loss = losses.bradley_terry_loss(jnp.array([2.0, 0.5]), jnp.array([0.5, 2.0]))
    np.testing.assert_allclose(loss, [math.log1p(math.exp(-1.5)), math.log1p(math.exp(1.5))],
                               rtol=1e-6)


def gae_reference(rewards, values, mask, gamma, lam):
    """GAE by a backwards loop over each row's response steps (NumPy, float64)."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = np.flatnonzero(mask[b])
        last_adv, next_value = 0.0, 0.0
        for t in steps[::-1]:
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last_adv = delta + gamma * lam * last_adv
            adv[b, t] = last_adv
            next_value = values[b, t]
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_numpy_loop(gamma, lam):
    rng = np.random.default_rng(1)
    b, t = 4, 12
    rewards, values = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    mask = np.zeros((b, t))
    for i, (s, e) in enumerate([(3, 12), (5, 9), (0, 12), (6, 7)]):  # prompt, response, padding
        mask[i, s:e] = 1
    mask[2, 4] = 0  # a hole inside a response is skipped
    adv, ret = losses.gae(rewards * mask, values * mask, mask, gamma, lam)
    want_adv, want_ret = gae_reference(rewards * mask, values * mask, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_ppo_clip_gradient_zero_outside_the_clip_range():
    old = jnp.zeros(4)
    mask = jnp.ones(4)
    eps = 0.2

    def grad_at(logp, adv):
        return jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, eps)[0])(logp)

    up, down, inside = math.log(1.5), math.log(0.5), math.log(1.1)
    # ratio 1.5 > 1 + eps with A > 0, and ratio 0.5 < 1 - eps with A < 0: clipped, no gradient
    g = grad_at(jnp.array([up, down, up, down]), jnp.array([1.0, -1.0, 2.0, -3.0]))
    np.testing.assert_array_equal(g, 0.0)
    # inside the range (or clipped on the side that does not bind): -A * ratio / n
    g = grad_at(jnp.array([inside, up, down, 0.0]), jnp.array([1.0, -1.0, 1.0, 2.0]))
    want = -np.array([1.0, -1.0, 1.0, 2.0]) * np.exp([inside, up, down, 0.0]) / 4
    np.testing.assert_allclose(g, want, rtol=1e-6)
    loss, clipfrac, _ = losses.ppo_policy_loss(jnp.array([up, down, inside, 0.0]), old,
                                               jnp.array([1.0, -1.0, 1.0, 1.0]), mask, eps)
    assert float(clipfrac) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", losses.KL_KINDS)
def test_kl_penalty_zero_when_policy_is_reference(kind):
    lp = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)) - 3)
    np.testing.assert_array_equal(losses.kl_penalty(lp, lp, kind), 0.0)
    score = jnp.array([1.0, -2.0, 0.5])
    mask = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 1]], jnp.float32)
    rewards, kl = losses.rlhf_rewards(score, lp, lp, mask, kl_coef=0.3, kl_kind=kind)
    want = np.zeros((3, 5))
    want[0, 4], want[1, 3], want[2, 4] = 1.0, -2.0, 0.5  # the score on the last response token
    np.testing.assert_allclose(rewards, want)


def test_k3_is_nonnegative_and_value_loss_clips():
    lp, ref = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-2.0, -1.0, -0.5])
    assert bool(jnp.all(losses.kl_penalty(lp, ref, "k3") >= 0))
    # V moved from 0 to 1 (clip 0.2 -> 0.2); return 0.5: max((1-.5)^2, (.2-.5)^2) / 2 = 0.125
    loss, frac = losses.value_loss(jnp.array([1.0]), jnp.array([0.0]), jnp.array([0.5]),
                                   jnp.array([1.0]), clip=0.2)
    assert float(loss) == pytest.approx(0.125) and float(frac) == 0.0


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    assert float(losses.masked_mean(jnp.ones(3), jnp.zeros(3))) == 0.0


def test_length_normalised_dpo_uses_mean_logps():
    # Length-normalised DPO / IPO (the ``config.dpo.length_normalize`` option): sequence log-probs
    # are means over the response tokens, so a longer response is not penalised by its length.
    logp = jnp.array([[0.0, -1.0, -2.0, -3.0], [0.0, -1.0, -1.0, 0.0]])
    mask = jnp.array([[0, 1, 1, 1], [0, 1, 1, 0]], jnp.float32)
    np.testing.assert_allclose(losses.sequence_logps(logp, mask), [-6.0, -2.0])
    np.testing.assert_allclose(losses.sequence_logps(logp, mask, length_normalize=True), [-2.0, -1.0])
    # An empty response (all-zero mask) gives 0, not NaN.
    assert float(losses.sequence_logps(logp[:1], jnp.zeros((1, 4)), True)[0]) == 0.0
