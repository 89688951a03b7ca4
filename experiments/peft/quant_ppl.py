"""Perplexity of the Shakespeare base model under weight quantization (research.quant):
float32, int8 weight-only (per-channel absmax), LLM.int8() (vector-wise int8 with outlier
features >= 6.0 kept in float; and with no outliers, threshold = inf), and NF4 (block 64, double
quantization), all on the same validation windows.

    python experiments/peft/quant_ppl.py --base workdirs/peft_base --batches 50
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # for configs/ when run as a script

RULES = (r"attn/(query|key|value|out)/kernel$", r"mlp/\w+/kernel$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--manual_dir", default=None)
    ap.add_argument("--threshold", type=float, default=6.0)
    a = ap.parse_args()
    from configs.finetune_shakespeare import get_config
    from research.peft import lora
    from research.quant import int8, nf4
    from research.tasks.finetune import FinetuneTask

    config = get_config("method=full")
    config.finetune.base_workdir = a.base
    config.eval_batches = a.batches
    if a.manual_dir:
        config.data.manual_dir = a.manual_dir
    task = FinetuneTask(config)
    base = jax.tree.map(jnp.asarray, task.base)
    batches = task.eval_batches(config.batch_size)
    model = task.model
    tokens0 = jnp.asarray(batches[0]["inputs"])
    targets = lora.find_targets(lambda p: model.apply({"params": p}, tokens0), base, RULES)
    n_in = {f"{k}/kernel": t.n_in for k, t in targets.items()}

    def mean_loss(apply_fn):
        f = jax.jit(lambda b: optax.softmax_cross_entropy_with_integer_labels(
            apply_fn(b["inputs"]), b["targets"]).mean())
        return float(np.mean([f(jax.tree.map(jnp.asarray, b)) for b in batches]))

    plain = lambda p: (lambda t: model.apply({"params": p}, t))  # noqa: E731
    q8 = int8.quantize_tree(base, RULES, n_in=n_in)
    q4 = nf4.quantize_tree(base, RULES)
    runs = {
        "float32": plain(base),
        "int8 weight-only": plain(int8.dequantize_tree(q8)),
        f"LLM.int8 (threshold {a.threshold})": int8.llm_int8_apply(plain(base), a.threshold),
        "int8 vector-wise (no outliers)": int8.llm_int8_apply(plain(base), math.inf),
        "NF4 + double quant": plain(nf4.dequantize_tree(q4)),
    }
    rows = []
    ref = None
    for name, fn in runs.items():
        loss = mean_loss(fn)
        ref = loss if ref is None else ref
        rows.append(dict(method=name, val_loss=loss, perplexity=math.exp(loss),
                         ppl_change_pct=100 * (math.exp(loss) / math.exp(ref) - 1)))
        print(json.dumps(rows[-1]), flush=True)
    stats: list = []
    int8.llm_int8_apply(plain(base), a.threshold, stats=stats)(tokens0)   # eagerly: concrete stats
    frac = [float(f) for _, f in stats]
    kernels = _kernels(base, n_in)
    print(f"quantized kernels: {len(kernels)}, float32 {4 * sum(k.size for k in kernels):,} bytes, "
          f"int8 {_int8_bytes(q8):,} bytes, NF4 {nf4.bits_per_param(q4):.4f} bits/param; "
          f"LLM.int8 outlier input features (threshold {a.threshold}, one batch): "
          f"{100 * np.mean(frac):.2f}% on average, max {100 * np.max(frac):.2f}%")
    print("| method | val loss | perplexity | change |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['val_loss']:.4f} | {r['perplexity']:.3f} | "
              f"{r['ppl_change_pct']:+.2f}% |")


def _kernels(params, n_in):
    from flax import traverse_util
    flat = traverse_util.flatten_dict(params, sep="/")
    return [flat[k] for k in n_in]


def _int8_bytes(tree):
    from research.quant import int8
    return sum(x.nbytes() for x in jax.tree.leaves(tree, is_leaf=int8.is_int8) if int8.is_int8(x))


if __name__ == "__main__":
    main()
