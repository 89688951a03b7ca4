"""The PEFT table: every method fine-tuned from the same base on the same data for the same steps.

For each method it builds the task and the training state abstractly (``research.core.train
.build_state``) to count trainable parameters, optimizer-state bytes and total training-state
bytes (params + optimizer state + the NF4 constants held outside the params under QLoRA), then
trains it with the generic loop and reads ms/step and the final validation loss / bits per char.
Results go to ``OUT/results.jsonl`` and a Markdown table ``OUT/table.md``.

    python experiments/peft/run_table.py --base workdirs/peft_base --out workdirs/peft_table \
        --steps 500
    (quick: --steps 60 --methods full,lora1,lora8,qlora8,prompt,prefix)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

METHODS = {
    "full": "method=full",
    "lora1": "method=lora,rank=1",
    "lora4": "method=lora,rank=4",
    "lora8": "method=lora,rank=8",
    "lora16": "method=lora,rank=16",
    "qlora8": "method=qlora,rank=8",
    "prompt": "method=prompt",
    "prefix": "method=prefix",
}


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(name: str, arg: str, base: str, out: str, steps: int, manual_dir: str | None):
    from configs.finetune_shakespeare import get_config
    from research.core import train
    from research.core.mesh import make_mesh
    from research.peft import lora
    from research.tasks.finetune import FinetuneTask

    config = get_config(f"{arg},steps={steps}")
    config.finetune.base_workdir = base
    if manual_dir:
        config.data.manual_dir = manual_dir
    config.eval_every = steps
    config.checkpoint_every = steps
    task = FinetuneTask(config)
    _, _, _, abstract, _ = train.build_state(task, config, make_mesh(config.mesh))
    params, opt = abstract["params"], abstract["opt_state"]
    mask = task.trainable(params) if task.trainable else jax.tree.map(lambda _: True, params)
    n_train = sum(int(np.prod(p.shape)) for p, m in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(mask)) if m)
    n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(task.base))
    frozen = task.frozen_bytes()
    base_kernel_bytes = None
    if task.frozen:  # bytes of the quantized kernels vs the same kernels in bf16
        from flax import traverse_util
        flat = traverse_util.flatten_dict(task.base, sep="/")
        base_kernel_bytes = 2 * sum(flat[k].size for k in task.frozen)
    t0 = time.time()
    summary = train.run(config, task, os.path.join(out, name))
    row = dict(
        method=name, arg=arg, steps=steps, trainable=n_train, trainable_pct=100 * n_train / n_base,
        opt_state_bytes=nbytes(opt), params_bytes=nbytes(params), frozen_const_bytes=frozen,
        state_bytes=nbytes(params) + nbytes(opt) + frozen,
        nf4_vs_bf16=(frozen / base_kernel_bytes) if base_kernel_bytes else None,
        ms_per_step=summary.get("perf/ms_per_step"), val_loss=summary.get("val/loss"),
        val_bpc=summary.get("val/bits_per_char"), wall_s=time.time() - t0)
    if "lora" in params:  # what an adapter-only file (research.peft.lora.save) holds
        row["adapter_bytes"] = lora.count(params["lora"]) * 4
    return row


def table(rows) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    head = ("| method | trainable | % | opt-state bytes | % of full | train-state bytes | "
            "ms/step | val loss | val bpc |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        pct_full = f"{100 * r['opt_state_bytes'] / full['opt_state_bytes']:.2f}" if full else "-"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.3f} | "
                     f"{r['opt_state_bytes']:,} | {pct_full} | {r['state_bytes']:,} | "
                     f"{r['ms_per_step']:.1f} | {r['val_loss']:.4f} | {r['val_bpc']:.4f} |")
    return head + "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True, help="workdir of the pretraining run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--manual_dir", default=None)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for name in a.methods.split(","):
        if name not in METHODS:
            raise SystemExit(f"--methods: unknown {name!r}; known: {sorted(METHODS)}")
        row = measure(name, METHODS[name], a.base, a.out, a.steps, a.manual_dir)
        rows.append(row)
        with open(os.path.join(a.out, "results.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    md = table(rows)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
