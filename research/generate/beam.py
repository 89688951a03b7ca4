"""KV-cached beam search for ``research.models.transformer.Decoder``, as Hugging Face's.

``beam_search`` follows ``transformers``' (vectorised, >= 4.50) ``GenerationMixin._beam_search``
with ``early_stopping=True`` and no logits processors, step for step:

* the running beams of a row start as one beam (score 0) and ``num_beams - 1`` dummies (score
  -1e9), so the first step expands only the prompt;
* each step adds ``log_softmax(logits)`` of every running beam to its score and takes the top
  ``2 * num_beams`` (beam, token) candidates of the row over ``num_beams * vocab``;
* a candidate "hits" when its token is ``eos_id`` or it reaches the last position; the best
  ``num_beams`` non-hitting candidates are the next running beams; hitting candidates among the
  top ``num_beams`` become finished hypotheses with score
  ``sum_logprobs / generated_length ** length_penalty`` (``generated_length`` counts the new
  tokens, EOS included) and enter the row's ``num_beams`` best finished hypotheses, unless the row
  already has ``num_beams`` of them (then the row is done: early stopping);
* the loop ends when every row is done or after ``max_new_tokens`` steps.

Positions after a hypothesis' EOS hold ``eos_id``. Everything after the argument checks is one
jitted program: a prefill of the prompt (batch ``B``, its caches then repeated per beam), then
single-token decode steps in a ``lax.while_loop``; beams are reordered by gathering every cache
leaf along its leading (batch) axis, so any cache layout whose array leaves are
``[batch, ...]`` works (e.g. grouped-query caches with fewer key/value heads; scalar leaves are
left alone).
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from research.models.transformer import init_caches

_NEG = -1.0e9  # HF's "impossible" score offset


@functools.lru_cache(maxsize=64)
def _build(model, num_beams: int, max_new_tokens: int):
    """The jitted program for one model, beam count and length (any prompt shape, length
    penalty and EOS id: those are arguments)."""
    cfg = model.cfg
    k = num_beams
    n_keep = 2 * k  # HF: max(2, 1 + number of EOS ids) * num_beams

    def forward(params, tokens, caches, index):
        logits, caches = model.apply({"params": params}, tokens, caches, index, method="decode")
        return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1), caches

    def gather(x, idx):  # x [B, M, ...], idx [B, J] -> [B, J, ...]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    @jax.jit
    def run(params, prompt, denom, eos_id):
        """denom [max_new_tokens]: generated_length ** length_penalty; eos_id: -1 for none."""
        batch, t0 = prompt.shape
        total = t0 + max_new_tokens
        vocab = cfg.vocab_size
        fill = jnp.maximum(eos_id, 0)
        logp, caches = forward(params, prompt, init_caches(cfg, batch, total), 0)
        # Replicate per beam: row b's beams are rows b * k .. b * k + k - 1.
        caches = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x, caches)
        logp = jnp.repeat(logp, k, axis=0)

        seqs = jnp.full((batch, k, total), fill, jnp.int32).at[:, :, :t0].set(prompt[:, None])
        state = dict(
            step=jnp.int32(0),
            logp=logp,
            caches=caches,
            run_seqs=seqs,
            run_scores=jnp.full((batch, k), _NEG, jnp.float32).at[:, 0].set(0.0),
            fin_seqs=seqs,
            fin_scores=jnp.full((batch, k), _NEG, jnp.float32),
            fin_flags=jnp.zeros((batch, k), bool),
        )
        top_mask = jnp.arange(n_keep) < k

        def select(s):
            """One beam step from the log-probs of the running beams at position t0 + step."""
            cur = t0 + s["step"]
            scores = s["logp"].reshape(batch, k, vocab) + s["run_scores"][:, :, None]
            top_lp, top_idx = jax.lax.top_k(scores.reshape(batch, k * vocab), n_keep)
            src, tok = top_idx // vocab, top_idx % vocab
            cand = gather(s["run_seqs"], src)
            cand = jax.lax.dynamic_update_slice_in_dim(cand, tok[:, :, None], cur, axis=2)
            hits = (cur + 1 >= total) | (tok == eos_id)
            # Next running beams: the best non-hitting candidates.
            run_lp = top_lp + hits * _NEG
            _, nxt = jax.lax.top_k(run_lp, k)
            run_seqs, run_scores = gather(cand, nxt), gather(run_lp, nxt)
            # Finished hypotheses: hitting candidates among the top k, unless the row is full.
            just = hits & top_mask
            fin_lp = top_lp / denom[s["step"]]
            full = jnp.all(s["fin_flags"], axis=-1, keepdims=True)
            fin_lp = fin_lp + full * _NEG + (~just) * _NEG
            m_seqs = jnp.concatenate([s["fin_seqs"], cand], axis=1)
            m_scores = jnp.concatenate([s["fin_scores"], fin_lp], axis=1)
            m_flags = jnp.concatenate([s["fin_flags"], just], axis=1)
            _, best = jax.lax.top_k(m_scores, k)
            # Reorder the caches: new beam j of row b continues old beam src[b, nxt[b, j]].
            parent = (gather(src, nxt) + jnp.arange(batch)[:, None] * k).reshape(-1)
            caches = jax.tree.map(lambda x: jnp.take(x, parent, axis=0) if x.ndim else x,
                                  s["caches"])
            return dict(s, step=s["step"] + 1, caches=caches, run_seqs=run_seqs,
                        run_scores=run_scores, fin_seqs=gather(m_seqs, best),
                        fin_scores=gather(m_scores, best), fin_flags=gather(m_flags, best))

        def cond(s):
            return (s["step"] < max_new_tokens) & ~jnp.all(s["fin_flags"])

        def body(s):  # decode the running beams' last tokens, then select
            cur = t0 + s["step"]
            last = jax.lax.dynamic_slice_in_dim(s["run_seqs"], cur - 1, 1, axis=2)
            logp, caches = forward(params, last.reshape(batch * k, 1), s["caches"], cur - 1)
            return select(dict(s, logp=logp, caches=caches))

        state = jax.lax.while_loop(cond, body, select(state))
        return state["fin_seqs"], state["fin_scores"]

    return run


def beam_search(model, params, prompt: jax.Array, *, num_beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, eos_id: int | None = None,
                return_all_beams: bool = False):
    """Beam search continuation of ``prompt`` (int ``[B, T0]``) by ``max_new_tokens`` tokens.

    Returns ``(tokens, scores)``: int32 ``[B, T0 + max_new_tokens]`` (the prompt, then the best
    hypothesis of each row, positions after its EOS filled with ``eos_id``) and float32 ``[B]``
    (its ``sum of log-probs / generated_length ** length_penalty``). With
    ``return_all_beams=True``: all ``num_beams`` finished hypotheses, best first,
    ``[B, num_beams, T0 + max_new_tokens]`` and ``[B, num_beams]``.

    Semantics of Hugging Face's ``generate(num_beams=..., do_sample=False, early_stopping=True,
    length_penalty=...)`` (see the module docstring); ``num_beams=1`` is greedy decoding.
    Requires ``T0 + max_new_tokens <= cfg.max_len`` (no context windowing).
    """
    cfg = model.cfg
    for name, value, low in (("num_beams", num_beams, 1), ("max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty={length_penalty!r} must be a finite number.")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, numbers.Integral)
                               or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id={eos_id!r} must be None or a token id in "
                         f"[0, vocab_size={cfg.vocab_size}).")
    if cfg.vocab_size < 2:
        raise ValueError(f"beam search needs vocab_size >= 2; got {cfg.vocab_size}.")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer tokens [B, T0] with T0 >= 1; got "
                         f"{prompt.dtype}{list(prompt.shape)}.")
    t0 = prompt.shape[1]
    if t0 + max_new_tokens > cfg.max_len:
        raise ValueError(
            f"prompt length {t0} + max_new_tokens={max_new_tokens} exceeds the model's context "
            f"config.model.max_len={cfg.max_len}; beam search does not window the context: "
            f"shorten the prompt or lower max_new_tokens.")
    # generated_length ** length_penalty in float64, then float32 (as HF's Python float divisor).
    denom = np.arange(1, max_new_tokens + 1, dtype=np.float64) ** float(length_penalty)
    seqs, scores = _build(model, int(num_beams), int(max_new_tokens))(
        params, prompt.astype(jnp.int32), jnp.asarray(denom, jnp.float32),
        jnp.int32(-1 if eos_id is None else int(eos_id)))
    if return_all_beams:
        return seqs, scores
    return seqs[:, 0], scores[:, 0]
