"""Linear probe on a trained CLIP's frozen image features, with the regularisation chosen on a
validation split of the *training* images (as the CLIP paper's probes: a sweep on validation, the
test split touched once at the chosen value).

    python -m experiments.clip.probe_sweep --workdir workdirs/clip_fmnist [--val 5000] \
        [--l2 1e-6,1e-5,1e-4,1e-3,1e-2] [--steps 500]

The launcher's evaluation (``research.tasks.clip``) fits its probe on the first
``zero_shot.probe_examples`` (10k) training images at a fixed l2 = 1e-4; this script fits on all
60k minus ``--val`` and reports, for each feature kind (the image tower's pooled features and the
projected, normalised embedding), the validation accuracy of every l2 and the test accuracy of the
best one. Writes ``WORKDIR/probe_sweep.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.clip.probe_sweep")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--val", type=int, default=5000, help="training images held out for the sweep")
    parser.add_argument("--l2", default="1e-6,1e-5,1e-4,1e-3,1e-2")
    parser.add_argument("--steps", type=int, default=500, help="L-BFGS iterations")
    args = parser.parse_args(argv)
    import numpy as np

    from research.eval import zero_shot as zs
    from research.tasks.clip import load_clip

    task, params, step = load_clip(args.workdir)
    train_x, train_y = task._split("train")
    test_x, test_y = task._split("test")
    if not 0 < args.val < len(train_x):
        print(f"--val={args.val}: expected 0 < val < {len(train_x)}", file=sys.stderr)
        return 2
    perm = np.random.default_rng(0).permutation(len(train_x))
    fit_idx, val_idx = perm[args.val:], perm[:args.val]
    feats_train = task.features(params, train_x)
    feats_test = task.features(params, test_x)
    grid = [float(v) for v in args.l2.split(",")]
    res = {"checkpoint_step": step, "fit_examples": int(len(fit_idx)), "val_examples": args.val,
           "steps": args.steps}
    for kind, j in (("pooled_features", 0), ("embedding", 1)):
        xtr, xte = feats_train[j], feats_test[j]
        val_acc = {}
        for l2 in grid:
            r = zs.linear_probe(xtr[fit_idx], train_y[fit_idx], xtr[val_idx], train_y[val_idx],
                                10, l2=l2, steps=args.steps)
            val_acc[l2] = r["accuracy"]
            print(f"{kind:16s} l2={l2:g}: val {r['accuracy']:.4f} (train {r['train_accuracy']:.4f})",
                  flush=True)
        best = max(grid, key=lambda v: (val_acc[v], v))  # ties -> the stronger regulariser
        test = zs.linear_probe(xtr[fit_idx], train_y[fit_idx], xte, test_y, 10, l2=best,
                               steps=args.steps)
        res[kind] = {"val_accuracy": {f"{k:g}": v for k, v in val_acc.items()}, "best_l2": best,
                     "test_accuracy": test["accuracy"], "dim": int(xtr.shape[1])}
        print(f"{kind:16s} best l2={best:g}: test {test['accuracy']:.4f}", flush=True)
    with open(os.path.join(args.workdir, "probe_sweep.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
