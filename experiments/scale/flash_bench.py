"""FlashAttention-style blockwise attention vs naive attention: memory and time of a
forward + backward pass at long sequence lengths (CPU).

    nice -n 10 python -m experiments.scale.flash_bench [--seqs 1024,4096,8192] [--repeats 3]

For each length T (batch 1, ``--heads`` heads of dim 64, causal) it compiles
``grad(sum(attention(q, k, v) * w))`` with respect to q, k and v for the naive path
(``research.nn.attention.dot_product_attention``: the full [T, T] scores) and the blockwise one
(``research.nn.flash``: 512 x 512 blocks, the backward recomputes them), and prints the XLA
buffer assignment's temporaries (``compiled.memory_analysis().temp_size_in_bytes``: the working
memory of the whole forward + backward; the inputs and outputs are the same for both) and the
median wall time of ``--repeats`` runs after one warm-up. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from research.nn.attention import causal_mask, dot_product_attention
from research.nn.flash import attention


def grad_fn(impl: str, t: int):
    if impl == "naive":
        mask = causal_mask(t, t)
        f = lambda q, k, v: dot_product_attention(q, k, v, mask)  # noqa: E731
    else:
        f = lambda q, k, v: attention(q, k, v, causal=True)  # noqa: E731
    return jax.jit(jax.grad(lambda q, k, v, w: jnp.sum(f(q, k, v) * w), (0, 1, 2)))


def measure(impl: str, t: int, heads: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=(1, t, heads, 64)), jnp.float32) for _ in range(4))
    fn = grad_fn(impl, t)
    compiled = fn.lower(q, k, v, w).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(q, k, v, w))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, w))
        times.append(time.perf_counter() - t0)
    return {"temp_bytes": int(temp), "median_s": statistics.median(times), "times_s": times}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", default="1024,4096,8192")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = []
    print(f"{'T':>6} {'naive temp':>12} {'flash temp':>12} {'ratio':>7} "
          f"{'naive s':>9} {'flash s':>9} {'time ratio':>10}", flush=True)
    for t in (int(s) for s in args.seqs.split(",")):
        n = measure("naive", t, args.heads, args.repeats)
        f = measure("blockwise", t, args.heads, args.repeats)
        rows.append({"seq": t, "naive": n, "blockwise": f})
        print(f"{t:>6} {n['temp_bytes'] / 2**20:>9.1f} MiB {f['temp_bytes'] / 2**20:>9.1f} MiB "
              f"{n['temp_bytes'] / f['temp_bytes']:>6.1f}x {n['median_s']:>9.3f} "
              f"{f['median_s']:>9.3f} {f['median_s'] / n['median_s']:>9.2f}x", flush=True)
    print(json.dumps({"heads": args.heads, "head_dim": 64, "rows": rows}))


if __name__ == "__main__":
    main()
