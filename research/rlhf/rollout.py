"""Rollouts: continuations sampled from a policy with the KV-cached sampler, and what RLHF and the
evaluations compute on them (log-probs under policy and reference, values, entropy, reward-model
scores, the true preference rate, the KL to the reference).

Layout: a rollout is ``tokens [B, T]`` = ``prompt_len`` prompt tokens then ``response_len`` sampled
tokens (T <= the model's context) and ``mask [B, T]``, 1 on the response. Per-token arrays
``[B, T]`` hold at ``t`` the quantity of token ``t`` (its log-prob given ``tokens[<t]``, the value
of the state before it, the entropy of the distribution it was drawn from).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from research.generate.sampling import generate
from research.rlhf import losses
from research.rlhf.models import apply_head, logits_and_hidden, reward_scores


def sample_responses(model, params, prompts, rng, response_len: int, temperature: float = 1.0):
    """``prompts [B, P]`` -> ``(tokens [B, P + R], mask [B, P + R])`` with ``R = response_len``
    tokens drawn from ``model`` (KV cache; the same ``rng`` gives the same tokens)."""
    tokens = generate(model, params, jnp.asarray(prompts, jnp.int32), max_new_tokens=response_len,
                      rng=rng, temperature=temperature)
    p = prompts.shape[1]
    mask = jnp.broadcast_to((jnp.arange(tokens.shape[1]) >= p).astype(jnp.float32), tokens.shape)
    return tokens, mask


def policy_stats(model, params, tokens, value_head=None, temperature: float = 1.0):
    """Per-token ``logp``, ``entropy`` (and ``values`` when ``value_head`` params are given) of
    ``tokens [B, T]`` under a decoder's params, each ``[B, T]`` with entry 0 = 0."""
    logits, hidden = logits_and_hidden(model, params, tokens[:, :-1])
    logits = logits / temperature
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    out = {"logp": losses.shifted_token_logps(logits, tokens),
           "entropy": pad(losses.entropy(logits))}
    if value_head is not None:
        out["values"] = pad(apply_head(value_head, hidden))
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score(model, rm_model, ref_params, rm_params, tokens, mask):
    ref = policy_stats(model, ref_params, tokens)["logp"]
    score = (reward_scores(rm_model, rm_params, tokens, mask) if rm_model is not None
             else jnp.zeros(tokens.shape[0]))
    return ref, score


def evaluate_policy(model, params, prompts: np.ndarray, rng, response_len: int, tokenizer,
                    preference, ref_params=None, rm_model=None, rm_params=None,
                    batch_size: int = 256) -> dict:
    """Samples one continuation per prompt (temperature 1) and reports ``true_preference_rate``
    (the ground-truth rule on the decoded responses), ``kl`` (the mean over sequences of
    ``sum_t log pi - log ref`` of the sampled tokens: a Monte Carlo estimate of the sequence-level
    KL(pi || ref)), ``reward`` (reward-model score, when given) and ``entropy`` (per token)."""
    rates, kls, rewards, ents, texts = [], [], [], [], []
    stats = jax.jit(policy_stats, static_argnums=0)
    p = prompts.shape[1]
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        tokens, mask = sample_responses(model, params, chunk, jax.random.fold_in(rng, i), response_len)
        own = stats(model, params, tokens)
        if ref_params is not None or rm_model is not None:
            ref_logp, score = _score(model, rm_model, ref_params if ref_params is not None else params,
                                     rm_params, tokens, mask)
            kls.append(np.asarray(losses.masked_sum(own["logp"] - ref_logp, mask, axis=1)))
            rewards.append(np.asarray(score))
        ents.append(np.asarray(losses.masked_mean(own["entropy"], mask)))
        decoded = [tokenizer.decode(row[p:]) for row in np.asarray(tokens)]
        texts += decoded
        rates += [preference.score(t) for t in decoded]
    out = {"true_preference_rate": float(np.mean(rates)), "entropy": float(np.mean(ents)),
           "num_samples": len(rates)}
    if ref_params is not None:
        out["kl"] = float(np.mean(np.concatenate(kls)))
    if rm_model is not None:
        out["reward"] = float(np.mean(np.concatenate(rewards)))
    out["examples"] = texts[:8]
    return out
