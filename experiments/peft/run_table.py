"""The PEFT table: every method fine-tuned from the same base on the same data for the same steps.

For each method it builds the task and the training state abstractly (``research.core.train
.build_state``) to count trainable parameters, optimizer-state bytes and total training-state
bytes (params + optimizer state + the NF4 constants held outside the params under QLoRA), then
trains it with the generic loop and reads ms/step and the final validation loss / bits per char.
Results go to ``OUT/results.jsonl`` and a Markdown table ``OUT/table.md``.

    python experiments/peft/run_table.py --base workdirs/peft_base --out workdirs/peft_table \
        --steps 500
    (quick: --steps 60 --methods full,lora1,lora8,qlora8,prompt,prefix)

The trainable fraction of LoRA depends on the base's width (q/v adapters: 4 L E r of ~12 L E^2):
``--count_sizes baby,default`` prints, without training, the LoRA counts (r in 1, 4, 8, 16 on
query/value) and Adam-state bytes vs full fine-tuning for the sizes of
configs/gpt_shakespeare_char.py (vocabulary 65, tiny Shakespeare's characters):

    python experiments/peft/run_table.py --count_sizes baby,default
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # for configs/ when run as a script

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


def count_sizes(sizes: list[str], vocab_size: int = 65) -> str:
    """Markdown: LoRA q/v adapter counts per rank for the gpt_shakespeare_char sizes (abstract
    init with ``jax.eval_shape``: nothing is trained or allocated)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from configs.finetune_shakespeare import TARGETS
    from configs.gpt_shakespeare_char import get_config as gpt_config
    from research.models.transformer import Decoder, TransformerConfig
    from research.peft import lora

    out = ["| size | params | LoRA r | trainable | % (= Adam state, % of full FT) |",
           "|---|---:|---:|---:|---:|"]
    for size in sizes:
        mc = TransformerConfig.from_dict(gpt_config(f"size={size}").model.to_dict(),
                                         vocab_size=vocab_size)
        model = Decoder(mc)
        tokens = jnp.zeros((1, mc.max_len), jnp.int32)
        params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        targets = lora.find_targets(lambda p: model.apply({"params": p}, tokens), params,
                                    TARGETS["qv"])
        for r in (1, 4, 8, 16):
            k = sum(r * (int(np.prod(t.in_shape)) + int(np.prod(t.out_shape)))
                    for t in targets.values())
            out.append(f"| {size} | {n:,} | {r} | {k:,} | {100 * k / n:.3f} |")
    return "\n".join(out) + "\n"


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
    ap.add_argument("--base", help="workdir of the pretraining run")
    ap.add_argument("--out")
    ap.add_argument("--count_sizes", default=None,
                    help="e.g. 'baby,default': only print LoRA counts for these base sizes")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--manual_dir", default=None)
    a = ap.parse_args()
    if a.count_sizes:
        print(count_sizes(a.count_sizes.split(",")))
        return
    if not (a.base and a.out):
        ap.error("--base and --out are required (unless --count_sizes)")
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
