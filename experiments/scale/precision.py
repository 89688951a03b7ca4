"""Mixed precision: the baby GPT's loss curves in bf16 compute (fp32 parameters and optimizer
state) against fp32, over seeds, so the bf16 - fp32 difference is read against the seed-to-seed
noise.

    python -m experiments.scale.precision --workdir workdirs/precision [--seeds 1337 1] \
        [--steps 1000] [--manual_dir ../shared/data/tinyshakespeare]

Each (dtype, seed) is a launcher run of ``configs/gpt_shakespeare_char.py:size=baby`` with
``--config.model.dtype`` float32 / bfloat16 (skipped when its workdir already finished: the
command resumes an interrupted study), evaluated every ``--steps``/10 steps on the loop's 20 fixed
validation batches. Prints the validation losses per run, the final mean per dtype, the mean
absolute bf16 - fp32 difference per seed (same data order, same init) and the seed-to-seed
standard deviation of fp32, writes ``results.json`` and plots ``precision.png`` into
``--workdir``. On XLA:CPU bf16 matmuls are emulated: the step time printed is not a speed claim.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/gpt_shakespeare_char.py:size=baby"
DTYPES = ("float32", "bfloat16")


def train(workdir: Path, dtype: str, seed: int, steps: int, manual_dir: str | None) -> None:
    if (workdir / "summary.json").exists():
        return
    cmd = [sys.executable, "-m", "research.launch", "--config", CONFIG, "--workdir", str(workdir),
           f"--config.seed={seed}", f"--config.model.dtype={dtype}",
           f"--config.total_steps={steps}", f"--config.optim.decay_steps={steps}",
           f"--config.eval_every={max(steps // 10, 1)}", f"--config.log_every={max(steps // 20, 1)}"]
    if manual_dir:
        cmd.append(f"--config.data.manual_dir={manual_dir}")
    print("$", " ".join(cmd), flush=True)
    with open(workdir.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)


def curves(workdir: Path) -> dict:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    ms = [r["perf/ms_per_step"] for r in rows if "perf/ms_per_step" in r]
    return {"val": val, "median_ms_per_step": float(np.median(ms)) if ms else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--manual_dir", default=None)
    args = ap.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    runs = {}
    for seed in args.seeds:
        for dtype in DTYPES:
            wd = root / f"{dtype}_seed{seed}"
            train(wd, dtype, seed, args.steps, args.manual_dir)
            runs[(dtype, seed)] = curves(wd)
    steps = sorted(runs[(DTYPES[0], args.seeds[0])]["val"])
    print("val loss by step: " + " ".join(f"{s:>7d}" for s in steps))
    for (dtype, seed), c in runs.items():
        print(f"{dtype:>9s} seed {seed:<5d}  " + " ".join(f"{c['val'][s]:7.4f}" for s in steps)
              + f"   ({c['median_ms_per_step']:.1f} ms/step)")
    last = steps[-1]
    final = {d: [runs[(d, s)]["val"][last] for s in args.seeds] for d in DTYPES}
    diff = [abs(runs[("bfloat16", s)]["val"][st] - runs[("float32", s)]["val"][st])
            for s in args.seeds for st in steps]
    out = {"steps": steps, "seeds": args.seeds,
           "final_mean": {d: float(np.mean(v)) for d, v in final.items()},
           "final_seed_sd_fp32": float(np.std(final["float32"], ddof=1)) if len(args.seeds) > 1 else None,
           "mean_abs_bf16_minus_fp32": float(np.mean(diff)), "max_abs_bf16_minus_fp32": float(np.max(diff)),
           "runs": {f"{d}_seed{s}": c for (d, s), c in runs.items()}}
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}))
    (root / "results.json").write_text(json.dumps(out, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for (dtype, seed), c in runs.items():
        ax.plot(steps, [c["val"][s] for s in steps], ("-" if dtype == "float32" else "--"),
                marker="o", ms=3, label=f"{dtype} seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("baby GPT: bf16 compute vs fp32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "precision.png", dpi=120)
    print(f"wrote {root / 'precision.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
