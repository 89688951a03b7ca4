"""The objectives of alignment as pure functions of arrays: sequence log-probabilities, DPO / IPO,
Bradley-Terry, the KL penalty, GAE, and PPO's clipped surrogate and value losses.

Conventions: token arrays are ``[B, T]``; ``mask`` arrays are float ``[B, T]`` with 1 on the
positions that count (the response tokens) and 0 elsewhere (prompt, padding). Per-token
log-probabilities ``logp[b, t]`` are those of token ``t`` given the tokens before it.

References: DPO, Rafailov et al. 2023, eq. 7; IPO, Azar et al. 2023, eq. 17; Bradley-Terry reward
modelling, Ouyang et al. 2022, eq. 1; GAE, Schulman et al. 2016, eq. 16; PPO-clip, Schulman et
al. 2017, eq. 7; the clipped value loss and the per-token KL reward of RLHF as in OpenAI's
lm-human-preferences and Hugging Face TRL; the k3 KL estimator of Schulman's "Approximating KL
divergence" note.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_KINDS = ("sigmoid", "ipo")
KL_KINDS = ("k1", "abs", "mse", "k3")


def masked_sum(x, mask, axis=None):
    return jnp.sum(x * mask, axis=axis)


def masked_mean(x, mask, axis=None):
    """Mean of ``x`` over ``mask``; 0 where the mask is empty (never NaN)."""
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """``(x - mean) / std`` over the masked entries (advantage normalisation)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    return out if shift_mean else out + mean


def token_logps(logits, tokens):
    """``logits [B, T, V]`` predicting ``tokens [B, T]`` -> float32 log-probabilities ``[B, T]``.

    ``logits[:, t]`` is the prediction made for ``tokens[:, t]`` (shift before calling)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def shifted_token_logps(logits, tokens):
    """Next-token logits of a sequence's prefix ``[B, T', V]`` (``T'`` = T or T - 1: computed from
    ``tokens[:, :T']``) and the sequence ``[B, T]`` -> ``[B, T]`` where entry ``t`` is
    log p(tokens[t] | tokens[<t]) and entry 0 is 0."""
    lp = token_logps(logits[:, :tokens.shape[1] - 1], tokens[:, 1:])
    return jnp.pad(lp, ((0, 0), (1, 0)))


def entropy(logits):
    """Entropy of the categorical distributions ``logits [..., V]`` -> ``[...]`` (nats)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def sequence_logps(logp, mask, length_normalize: bool = False):
    """Sum (or, length-normalised, mean) of per-token log-probs over the mask -> ``[B]``."""
    return masked_mean(logp, mask, axis=-1) if length_normalize else masked_sum(logp, mask, axis=-1)


# -- preference objectives ------------------------------------------------------------------------
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0):
    """DPO (``kind='sigmoid'``) or IPO (``kind='ipo'``) loss per pair -> ``(loss [B], chosen
    reward [B], rejected reward [B])`` with the implicit rewards ``beta * (log pi - log ref)``.

    DPO: ``-log sigmoid(beta * h)`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (with
    ``label_smoothing`` e: ``-(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)``, cDPO).
    IPO: ``(h - 1 / (2 beta))^2`` (usually on length-normalised log-probs).
    When the policy equals the reference, ``h = 0`` and the DPO loss is ``log 2``.
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"DPO loss kind {kind!r}: expected one of {DPO_KINDS}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if kind == "sigmoid":
        loss = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    else:
        loss = jnp.square(h - 1.0 / (2.0 * beta))
    return loss, beta * chosen_logratio, beta * rejected_logratio


def bradley_terry_loss(reward_chosen, reward_rejected):
    """``-log sigmoid(r_chosen - r_rejected)`` per pair: the negative log-likelihood of the
    preference under the Bradley-Terry model ``P(c > r) = sigmoid(r_c - r_r)``."""
    return -jax.nn.log_sigmoid(reward_chosen - reward_rejected)


# -- RLHF / PPO -----------------------------------------------------------------------------------
def kl_penalty(logp, ref_logp, kind: str = "k1"):
    """Per-token estimate of KL(policy || reference) from the log-probs of sampled tokens.

    'k1': ``logp - ref_logp`` (unbiased, can be negative; what RLHF's reward subtracts), 'abs':
    its absolute value, 'mse': ``0.5 (logp - ref_logp)^2``, 'k3': ``exp(r) - 1 - r`` with
    ``r = ref_logp - logp`` (unbiased and >= 0). All are 0 where policy == reference."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "abs":
        return jnp.abs(d)
    if kind == "mse":
        return 0.5 * jnp.square(d)
    if kind == "k3":
        return jnp.expm1(-d) + d
    raise ValueError(f"KL penalty kind {kind!r}: expected one of {KL_KINDS}")


def rlhf_rewards(score, logp, ref_logp, mask, kl_coef: float, kl_kind: str = "k1"):
    """Per-token rewards ``[B, T]``: ``-kl_coef * KL_t`` on every response token and the reward
    model's ``score [B]`` added on the last response token (Ziegler et al. 2019).
    Returns ``(rewards, kl [B, T])``."""
    kl = kl_penalty(logp, ref_logp, kl_kind) * mask
    last = last_index(mask)
    bonus = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * score[:, None]
    return -kl_coef * kl + bonus, kl


def last_index(mask):
    """Index of the last nonzero entry of each row of ``mask [B, T]`` (0 for an empty row)."""
    t = mask.shape[1]
    return jnp.max(jnp.where(mask > 0, jnp.arange(t)[None], 0), axis=1)


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over ``[B, T]`` arrays -> ``(advantages, returns)``.

    Only the masked (response) positions are steps of the episode; the value after the last one
    is 0 (the episode ends). Masked-out positions inside a row are skipped, so a mask need not be
    contiguous. ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``,
    returns ``A_t + V_t``."""
    rewards, values, mask = (jnp.asarray(a, jnp.float32) for a in (rewards, values, mask))

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        adv = jnp.where(m > 0, adv, next_adv)  # a skipped position passes the future through
        nv = jnp.where(m > 0, v, next_value)
        return (nv, adv), adv * m

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    adv = adv.T
    return adv, (adv + values) * mask


def ppo_policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2):
    """PPO's clipped surrogate (to minimise): ``mean(max(-A r, -A clip(r, 1-e, 1+e)))`` over the
    mask, with ``r = exp(logp - old_logp)``. Returns ``(loss, clip fraction, approx KL)``."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).astype(jnp.float32), mask)
    approx_kl = masked_mean(0.5 * jnp.square(logp - old_logp), mask)
    return loss, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, clip: float | None = 0.2):
    """``0.5 * mean(max((V - R)^2, (clip(V, V_old +- e) - R)^2))`` over the mask (the clipped
    value loss of OpenAI baselines / TRL; ``clip=None``: plain squared error).
    Returns ``(loss, value clip fraction)``."""
    err = jnp.square(values - returns)
    if clip is None:
        return 0.5 * masked_mean(err, mask), jnp.zeros(())
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    err_clipped = jnp.square(clipped - returns)
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    return loss, masked_mean((err_clipped > err).astype(jnp.float32), mask)
