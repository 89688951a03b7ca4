"""Compare decoder variants on tiny Shakespeare over several seeds: GPT (char), LLaMA-style (char,
same parameter count) and GPT on a byte-level BPE vocabulary, by validation bits per character.

    python experiments/transformer_family/compare.py --seeds 1337 1 2 --workdir workdirs/family \
        [--manual_dir ../shared/data/tinyshakespeare] [--batches 200]

Each (variant, seed) is trained with the launcher (skipped if its workdir already finished, so the
command resumes an interrupted study), then evaluated on ``--batches`` fixed batches of 64
validation windows (the 20-batch estimate of the loop is noisy, about +-0.02 nats). Bits per
character = loss per token x tokens per character / ln 2, with tokens per character measured on the
validation text (1 for the char tokenizer), so vocabularies compare. Prints one row per run and the
mean and standard deviation per variant, and writes ``results.json`` into ``--workdir``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {
    "gpt_char": "configs/gpt_shakespeare_char.py:size=baby",
    "llama_char": "configs/llama_shakespeare_char.py",
    "gpt_bpe": "configs/gpt_shakespeare_bpe.py",
}


def train(config: str, workdir: Path, seed: int, manual_dir: str | None) -> None:
    summary = workdir / "summary.json"
    if summary.exists():
        return
    cmd = [sys.executable, "-m", "research.launch", "--config", config, "--workdir", str(workdir),
           f"--config.seed={seed}"]
    if manual_dir:
        cmd.append(f"--config.data.manual_dir={manual_dir}")
    print("$", " ".join(cmd), flush=True)
    with open(workdir.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)


def evaluate(workdir: Path, batches: int, manual_dir: str | None) -> dict:
    import jax

    from research.data import tiny_shakespeare
    from research.data.windows import WindowSampler
    from research.sample import load_model
    from research.tasks.lm import measure_tokens_per_char

    task, params, step = load_model(str(workdir), "latest")
    loss = jax.jit(lambda p, b: task.loss(p, b, None, False)[0])
    text = tiny_shakespeare.load_text("validation", manual_dir=manual_dir)
    tokens = task.tokenizer.encode(text)
    tpc = measure_tokens_per_char(task.tokenizer, text, tokens)
    sampler = WindowSampler(tokens, 64, task.seq_len, seed=7)
    mean = float(np.mean([float(loss(params, sampler.batch_at(i))) for i in range(batches)]))
    return {"step": int(step), "loss_per_token": mean, "tokens_per_char": tpc,
            "bits_per_char": mean * tpc / math.log(2),
            "params": int(sum(x.size for x in jax.tree.leaves(params)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workdir", default="workdirs/family")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--manual_dir", default=os.environ.get("RESEARCH_SHAKESPEARE_DIR"))
    args = ap.parse_args()
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for seed in args.seeds:
        for name in args.variants:
            key = f"{name}_s{seed}"
            if key in results:
                continue
            workdir = root / key
            train(VARIANTS[name], workdir, seed, args.manual_dir)
            results[key] = {"variant": name, "seed": seed,
                            **evaluate(workdir, args.batches, args.manual_dir)}
            results_path.write_text(json.dumps(results, indent=1))
            r = results[key]
            print(f"{key:16s} params {r['params']:,}  loss/token {r['loss_per_token']:.4f}  "
                  f"bits/char {r['bits_per_char']:.4f}", flush=True)
    print("\nvariant      runs  bits/char mean  sd      (val, "
          f"{args.batches}x64 windows)")
    for name in args.variants:
        bpc = [r["bits_per_char"] for r in results.values() if r["variant"] == name]
        if bpc:
            sd = float(np.std(bpc, ddof=1)) if len(bpc) > 1 else float("nan")
            print(f"{name:12s} {len(bpc):4d}  {np.mean(bpc):.4f}          {sd:.4f}")


if __name__ == "__main__":
    main()
