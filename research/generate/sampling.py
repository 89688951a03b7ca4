"""Logit filters, token sampling and KV-cached autoregressive generation for ``Decoder``.

The filters are pure functions on float32 logits ``[..., V]`` (removed entries become ``-inf``).
``generate`` runs one jitted program per (prompt shape, ``max_new_tokens``, model, settings):
a prefill of the prompt, then an on-device ``lax.fori_loop`` of single-token decode steps (with a
``lax.cond`` that re-prefills a shorter context whenever the cache is full).
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp

from research.models.transformer import init_caches

# Incremented each time the generation program is traced (i.e. compiled); used by the tests.
TRACE_COUNTS: collections.Counter = collections.Counter()

# Top-p compares cumulative float32 probabilities with p: a mass that equals p in exact
# arithmetic (0.5 + 0.2 vs 0.7) may round just below it, so mass within this of p counts as p.
_TOP_P_TOL = 1e-6


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """Divide logits by ``temperature`` (> 0): < 1 sharpens, > 1 flattens the distribution."""
    return logits / jnp.asarray(temperature, logits.dtype)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the ``k`` largest logits along the last axis, set the others to ``-inf``.

    Exactly ``min(k, V)`` entries are kept: if several logits tie at the k-th largest value, the
    ones with the lowest indices are kept (``lax.top_k`` is stable).
    """
    k = min(int(k), logits.shape[-1])
    _, idx = jax.lax.top_k(logits, k)
    keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), idx, True, axis=-1, inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: keep the smallest set of most probable tokens whose total probability is
    >= ``p`` (never fewer than the top token), set the others to ``-inf``.

    Same semantics as Hugging Face's ``TopPLogitsWarper`` (with ``min_tokens_to_keep=1``): going
    down the tokens by decreasing probability, a token is kept iff the probability mass strictly
    before it is still < p. Equal probabilities are ordered by index (lowest first). ``p = 1``
    keeps every token. Sums are float32; mass within 1e-6 of ``p`` counts as reaching it.
    """
    v = logits.shape[-1]
    sorted_logits, idx = jax.lax.top_k(logits, v)  # descending, stable
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < p - _TOP_P_TOL) | (jnp.arange(v) == 0)
    keep_sorted = keep_sorted | (jnp.asarray(p) >= 1.0)
    keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), idx, keep_sorted, axis=-1,
                              inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


def _check_settings(temperature, top_k, top_p, greedy):
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (or pass greedy=True).")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must be None or in (0, 1].")


def sample_token(rng: jax.Array, logits: jax.Array, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 greedy: bool = False) -> jax.Array:
    """Sample one token per row from logits ``[B, V]`` -> int32 ``[B]``.

    Order as in Hugging Face: temperature, then top-k, then top-p, then a categorical draw.
    ``greedy=True`` returns the argmax (filters and temperature cannot change it, so they are
    ignored; ``rng`` may be None). Settings must be Python values (they are static under jit).
    """
    _check_settings(temperature, top_k, top_p, greedy)
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _build(model, max_new_tokens: int, settings: tuple):
    """The jitted generation program for one model and sampling setting (any prompt shape)."""
    cfg = model.cfg
    max_len = cfg.max_len
    keep = max(1, max_len // 2)  # tokens re-prefilled when the cache is full
    sample = functools.partial(sample_token, **dict(settings))

    def forward(params, tokens, caches, index):  # -> (logits of the last token [B, V], caches)
        logits, caches = model.apply({"params": params}, tokens, caches, index, method="decode")
        return logits[:, -1], caches

    @jax.jit
    def run(params, prompt, rng):
        TRACE_COUNTS[(model, max_new_tokens, settings)] += 1
        batch, t0 = prompt.shape
        buf = jnp.concatenate([prompt, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
        ctx_len = min(t0, max_len)  # prefill (at most) the last max_len prompt tokens
        logits, caches = forward(params, prompt[:, t0 - ctx_len:], init_caches(cfg, batch), 0)
        buf = buf.at[:, t0].set(sample(jax.random.fold_in(rng, t0), logits))

        def body(pos, state):  # sample the token at buf[:, pos]; buf[:, pos - 1] is not cached
            buf, caches, index = state  # index: cache slot for buf[:, pos - 1]

            def decode_one(caches):
                prev = jax.lax.dynamic_slice_in_dim(buf, pos - 1, 1, axis=1)
                return *forward(params, prev, caches, index), index + 1

            def refill(caches):  # cache full: last `keep` tokens into a fresh cache
                ctx = jax.lax.dynamic_slice_in_dim(buf, pos - keep, keep, axis=1)
                return *forward(params, ctx, init_caches(cfg, batch), 0), jnp.int32(keep)

            if buf.shape[1] < keep:  # the cache cannot fill (index < t0 + max_new_tokens < keep)
                logits, caches, index = decode_one(caches)
            else:
                logits, caches, index = jax.lax.cond(index >= max_len, refill, decode_one,
                                                     caches)
            tok = sample(jax.random.fold_in(rng, pos), logits)
            buf = jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], pos, axis=1)
            return buf, caches, index

        buf, _, _ = jax.lax.fori_loop(t0 + 1, t0 + max_new_tokens, body,
                                      (buf, caches, jnp.int32(ctx_len)))
        return buf

    return run


def generate(model, params, prompt: jax.Array, *, max_new_tokens: int, rng: jax.Array | None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             greedy: bool = False) -> jax.Array:
    """Autoregressively extend ``prompt`` (int ``[B, T0]``) by ``max_new_tokens`` tokens.

    Returns int32 ``[B, T0 + max_new_tokens]``: the whole prompt followed by the new tokens.
    ``model`` is a ``Decoder`` and ``params`` its parameters. Sampling settings are as in
    ``sample_token``; the token at output position ``t`` is drawn with
    ``jax.random.fold_in(rng, t)``, so the same ``rng`` gives the same tokens, and generating
    more tokens extends (does not change) a shorter generation from the same inputs.

    Uses the KV cache: one prefill, then one single-token decode per new token, all inside one
    jitted program (compiled once per prompt shape, ``max_new_tokens``, model and settings;
    greedy runs share one program whatever their temperature/top-k/top-p).

    Context handling (the cache holds at most ``L = cfg.max_len`` tokens, and learned positions
    stop there; rope/ALiBi models are windowed the same way): a prompt longer than ``L`` is conditioned on only through its last ``L`` tokens
    (as in nanoGPT; the full prompt is still returned). When the cache is full, the last
    ``L // 2`` tokens are re-prefilled into a fresh cache at positions ``0..`` and decoding
    continues, so every new token past the first window is conditioned on between ``L // 2``
    and ``L`` previous tokens (a naive sliding window would condition on exactly ``L`` but
    recompute the whole window per token).
    """
    _check_settings(temperature, top_k, top_p, greedy)
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0.")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer tokens [B, T0] with T0 >= 1; got "
                         f"{prompt.dtype}{list(prompt.shape)}.")
    prompt = prompt.astype(jnp.int32)
    if max_new_tokens == 0:
        return prompt
    if rng is None:
        if not greedy:
            raise ValueError("rng=None is only allowed with greedy=True.")
        rng = jax.random.PRNGKey(0)
    if greedy:  # temperature and filters cannot change the argmax: share one program
        settings = (("greedy", True),)
    else:
        settings = (("temperature", float(temperature)),
                    ("top_k", None if top_k is None else int(top_k)),
                    ("top_p", None if top_p is None else float(top_p)), ("greedy", False))
    return _build(model, int(max_new_tokens), settings)(params, prompt, rng)
