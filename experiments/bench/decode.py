"""Decode throughput with the KV cache vs recomputing the whole prefix for every new token.

* cache: ``research.generate.generate(..., greedy=True)`` -- one prefill of the prompt, then one
  single-token decode step per new token (a jitted ``lax.fori_loop``);
* no cache: a jitted ``lax.fori_loop`` that, for every new token, runs the full forward over a
  fixed-size buffer (the prompt and all new tokens, right-padded; the model is causal so the
  padding cannot change the logits at the current position) and takes the argmax of the logits
  at the current position -- the same work a cache-less decoder does, without retracing.

Greedy decoding, batch 1. Each case is compiled and run once (not timed), then timed over
``--repeats`` calls (median reported). Tokens/s counts new tokens only.

    python experiments/bench/decode.py            # 4 layers x 4 heads x 128, vocab 65, max_len 1088
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from research.generate import generate
from research.models.transformer import Decoder, TransformerConfig


@functools.lru_cache(maxsize=None)
def no_cache_program(model, max_new_tokens: int):
    @jax.jit
    def run(params, prompt):
        batch, t0 = prompt.shape
        buf = jnp.concatenate([prompt, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)

        def body(pos, buf):  # token at buf[:, pos] from the full forward over buf
            logits = model.apply({"params": params}, buf)
            last = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False)
            tok = jnp.argmax(last, axis=-1).astype(jnp.int32)
            return jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], pos, axis=1)

        return jax.lax.fori_loop(t0, t0 + max_new_tokens, body, buf)
    return run


def timed(fn, repeats: int):
    """(compile + first run seconds, [seconds of each later run], output)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, times, np.asarray(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--max-len", type=int, default=1088)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.prompt_len + max(args.new_tokens) > args.max_len:
        ap.error(f"--prompt-len + max(--new-tokens) = {args.prompt_len + max(args.new_tokens)} "
                 f"exceeds --max-len={args.max_len} (the cache would be re-windowed)")

    cfg = TransformerConfig(vocab_size=args.vocab, num_layers=args.layers, num_heads=args.heads,
                            embed_dim=args.embed, max_len=args.max_len)
    model = Decoder(cfg)
    key = jax.random.PRNGKey(args.seed)
    params = jax.jit(model.init)(key, jnp.zeros((1, 8), jnp.int32))["params"]
    prompt = jax.random.randint(jax.random.fold_in(key, 1), (1, args.prompt_len), 0, args.vocab)
    prompt = prompt.astype(jnp.int32)
    print(f"model {args.layers}x{args.heads}x{args.embed}, vocab {args.vocab}, max_len "
          f"{args.max_len}; batch 1, prompt {args.prompt_len}; {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}); median of {args.repeats} timed runs after a compile run")
    header = ("| new tokens | KV cache tok/s | no cache tok/s | speed-up | KV cache s | no cache s"
              " | compile+1st run s (cache / no cache) | same tokens |")
    print(header)
    print("| --- " * (header.count("|") - 1) + "|")
    for n in args.new_tokens:
        cached = lambda: generate(model, params, prompt, max_new_tokens=n, rng=None,  # noqa: E731
                                  greedy=True)
        full = functools.partial(no_cache_program(model, n), params, prompt)
        c_first, c_times, c_out = timed(cached, args.repeats)
        f_first, f_times, f_out = timed(full, args.repeats)
        c_med, f_med = statistics.median(c_times), statistics.median(f_times)
        diff = np.flatnonzero((c_out != f_out).any(axis=0))
        same = "yes" if diff.size == 0 else f"no (from position {diff[0]})"
        print(f"| {n} | {n / c_med:,.0f} | {n / f_med:,.1f} | {f_med / c_med:,.1f}x | "
              f"{c_med:.3f} | {f_med:.3f} | {c_first:.1f} / {f_first:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
