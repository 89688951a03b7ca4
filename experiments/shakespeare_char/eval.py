"""Validation loss of a trained workdir on many batches (a low-noise estimate).

    python experiments/shakespeare_char/eval.py WORKDIR [latest|best] [--batches 200]

The loop's own eval uses config.eval_batches batches (20 for :size=baby, as nanoGPT's
eval_iters=20), which is noisy (about +-0.02); this uses 200 fixed batches of 64 windows.
"""
import argparse

import jax
import numpy as np

from research.data import tiny_shakespeare
from research.data.windows import WindowSampler
from research.sample import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("checkpoint", nargs="?", default="latest")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--manual_dir", default=None)
    args = ap.parse_args()
    task, params, step = load_model(args.workdir, args.checkpoint)
    loss = jax.jit(lambda p, b: task.loss(p, b, None, False)[0])
    for split in ("validation", "train"):
        tokens = task.tokenizer.encode(tiny_shakespeare.load_text(split, manual_dir=args.manual_dir))
        sampler = WindowSampler(tokens, 64, task.seq_len, seed=7)
        losses = [float(loss(params, sampler.batch_at(i))) for i in range(args.batches)]
        print(f"{split}: step {step}, mean loss over {args.batches}x64 windows {np.mean(losses):.4f}")


if __name__ == "__main__":
    main()
