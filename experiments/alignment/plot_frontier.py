"""The reward-KL frontier: TRUE preference rate of sampled continuations against the KL to the SFT
reference, one curve per run (DPO, PPO), one point per evaluated checkpoint, the SFT level as a
horizontal line. Reads the ``alignment_eval.jsonl`` that ``python -m research.rlhf.evaluate
--all_checkpoints`` appends to each workdir (the last row per step wins).

    python experiments/alignment/plot_frontier.py --sft workdirs/alignment/sft \
        --runs workdirs/alignment/dpo workdirs/alignment/ppo --out workdirs/alignment/frontier.png

Also writes ``<out>.json`` (the points) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "alignment_eval.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: run `python -m research.rlhf.evaluate --workdir "
                         f"{workdir} --all_checkpoints` first.")
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True, help="the SFT run's workdir (the reference level)")
    ap.add_argument("--runs", nargs="+", required=True,
                    help="dpo / ppo workdirs; 'A,B' merges runs of one trajectory into one curve")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args(argv)

    sft = read_rows(args.sft)[-1]
    curves = {}
    for spec in args.runs:
        # "A,B": one curve from several runs of the same trajectory (e.g. a rerun of the first
        # steps with denser checkpoints); a step present in both is taken from the last one.
        ws = spec.split(",")
        by_step = {r["step"]: r for w in ws for r in read_rows(w)}
        rows = [by_step[s] for s in sorted(by_step)]
        label = f"{rows[-1]['task']} ({os.path.basename(os.path.normpath(ws[0]))})"
        # The SFT model is every run's step 0 (KL 0 by definition).
        pts = [(0.0, sft["true_preference_rate"], 0)] + [
            (r["kl"], r["true_preference_rate"], r["step"]) for r in rows]
        curves[label] = pts

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, pts in curves.items():
        kl, rate, steps = zip(*pts)
        ax.plot(kl, rate, "o-", label=label, markersize=4)
        ax.annotate(str(steps[-1]), (kl[-1], rate[-1]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    base = sft["true_preference_rate"]
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"SFT ({base:.3f})")
    ax.axhline(min(1.0, base + 0.30), color="gray", ls=":", lw=1, label="SFT + 30 pp")
    ax.set_xlabel("KL(policy || SFT reference) per sequence (nats, Monte Carlo)")
    ax.set_ylabel(f"true preference rate ({sft.get('preference', '')})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Alignment frontier: true preference rate vs KL")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"sft": base, "curves": curves}, f, indent=1)
    print(f"SFT true preference rate {base:.3f}")
    for label, pts in curves.items():
        for kl, rate, step in pts[1:]:
            print(f"{label:<28} step {step:>5}: rate {rate:.3f} ({rate - base:+.3f}) KL {kl:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
