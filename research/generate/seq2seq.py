"""Greedy decoding and beam search for ``research.models.seq2seq.EncoderDecoder`` over the
decoder's self-attention KV cache.

Both encode the source once, start the target from ``bos_id`` and return the generated tokens
without it, ``[B, max_new_tokens]``; positions after a sequence's EOS hold ``eos_id``.

``beam_search`` is ``research.generate.beam.beam_search`` (Hugging Face's beam search with
``early_stopping=True``: length penalty, EOS handling, the top ``2 * num_beams`` candidates per
step) run on an adapter that makes the encoder-decoder look like a decoder-only model: the
"prompt" is the BOS token, and each decode step runs ``EncoderDecoder.decode`` with the encoder
output and source mask (passed along with the parameters) repeated per beam. Beams are only ever
reordered within their own row, so repeating the encoder output once is exact.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp

from research.generate import beam as _beam
from research.models.transformer import init_caches


@functools.lru_cache(maxsize=64)
def _encode_fn(model):
    return jax.jit(lambda params, src: model.apply({"params": params}, src, method="encode"))


def encode(model, params, src):
    """``(enc_out [B, S, E], src_mask [B, S])`` of ``src`` (jitted, cached per model)."""
    return _encode_fn(model)(params, jnp.asarray(src))


def _check(model, src, max_new_tokens, bos_id, eos_id):
    cfg = model.cfg
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1.")
    if 1 + max_new_tokens > cfg.max_len:
        raise ValueError(f"BOS + max_new_tokens={max_new_tokens} target positions exceed the "
                         f"model's config.model.max_len={cfg.max_len}; lower max_new_tokens.")
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if value is None and name == "eos_id":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                or not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{name}={value!r} must be a token id in [0, {cfg.vocab_size}).")
    src = jnp.asarray(src)
    if src.ndim != 2 or not jnp.issubdtype(src.dtype, jnp.integer):
        raise ValueError(f"src must be integer tokens [B, S]; got {src.dtype}{list(src.shape)}.")
    return src.astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _greedy_fn(model, max_new_tokens: int):
    cfg = model.cfg

    @jax.jit
    def run(params, src, bos_id, eos_id):
        enc_out, src_mask = model.apply({"params": params}, src, method="encode")
        b = src.shape[0]
        fill = jnp.maximum(eos_id, 0)
        tokens = jnp.full((b, max_new_tokens + 1), fill, jnp.int32).at[:, 0].set(bos_id)
        state = (jnp.int32(0), tokens, init_caches(cfg, b, max_new_tokens + 1),
                 jnp.zeros((b,), bool))

        def cond(s):
            return (s[0] < max_new_tokens) & ~jnp.all(s[3])

        def body(s):
            i, tokens, caches, done = s
            last = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
            logits, caches = model.apply({"params": params}, last, enc_out, src_mask, caches, i,
                                         method="decode")
            nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, fill, nxt)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i + 1, axis=1)
            return i + 1, tokens, caches, done | (nxt == eos_id)

        return jax.lax.while_loop(cond, body, state)[1][:, 1:]

    return run


def greedy(model, params, src, *, max_new_tokens: int, bos_id: int, eos_id: int | None = None):
    """Greedy decoding: int32 ``[B, max_new_tokens]`` (the argmax token at each step; after EOS,
    ``eos_id``). Stops early once every row has produced EOS."""
    src = _check(model, src, max_new_tokens, bos_id, eos_id)
    return _greedy_fn(model, int(max_new_tokens))(
        params, src, jnp.int32(bos_id), jnp.int32(-1 if eos_id is None else eos_id))


@dataclasses.dataclass(frozen=True)
class _AsDecoder:
    """An encoder-decoder seen as a decoder-only model by ``research.generate.beam``: its
    ``params`` are ``{'model': params, 'enc_out': [B, S, E], 'src_mask': [B, S]}``."""

    model: object

    @property
    def cfg(self):
        return self.model.cfg

    def apply(self, variables, tokens, caches, index, method="decode"):
        assert method == "decode", method
        p = variables["params"]
        enc_out, src_mask = p["enc_out"], p["src_mask"]
        k = tokens.shape[0] // enc_out.shape[0]  # beams per row (1 for the first step)
        if k > 1:  # beam.py's layout: row b's beams are rows b * k .. b * k + k - 1
            enc_out, src_mask = jnp.repeat(enc_out, k, axis=0), jnp.repeat(src_mask, k, axis=0)
        return self.model.apply({"params": p["model"]}, tokens, enc_out, src_mask, caches, index,
                                method="decode")


def beam_search(model, params, src, *, num_beams: int, max_new_tokens: int, bos_id: int,
                eos_id: int | None = None, length_penalty: float = 1.0,
                return_all_beams: bool = False):
    """Beam search: ``(tokens, scores)``, int32 ``[B, max_new_tokens]`` (the best hypothesis,
    ``eos_id`` after its EOS) and float32 ``[B]`` (``sum of log-probs / generated_length **
    length_penalty``, the length counting EOS). ``return_all_beams``: all ``num_beams`` finished
    hypotheses, best first, ``[B, num_beams, max_new_tokens]`` and ``[B, num_beams]``.
    ``num_beams=1`` equals ``greedy``. See ``research.generate.beam`` for the exact semantics."""
    src = _check(model, src, max_new_tokens, bos_id, eos_id)
    enc_out, src_mask = encode(model, params, src)
    prompt = jnp.full((src.shape[0], 1), bos_id, jnp.int32)
    seqs, scores = _beam.beam_search(
        _AsDecoder(model), {"model": params, "enc_out": enc_out, "src_mask": src_mask}, prompt,
        num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
        eos_id=eos_id, return_all_beams=return_all_beams)
    return seqs[..., 1:], scores
