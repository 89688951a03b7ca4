"""Rematerialisation (gradient checkpointing) policies: memory and time of a GPT train step.

    nice -n 10 python -m experiments.scale.remat_bench [--policies none,full,dots_saveable]
        [--layers 4 --embed 128 --heads 4 --context 256 --batch 16 --steps 8]

Each block is wrapped in ``nn.remat`` with the named policy (``config.model.remat``; 'full'
recomputes the whole block in the backward pass, 'dots_saveable' keeps the matmul outputs and
recomputes the rest, 'none' keeps everything). Printed per policy: the compiled train step's
temporaries (``memory_analysis().temp_size_in_bytes``: the activations kept for the backward pass
and the working buffers) and the median step time over ``--steps`` steps after compilation, on
synthetic tokens (one device). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from configs.gpt_shakespeare_char import get_config
from research.aot import memory_report
from research.core import sharding, train
from research.core.mesh import make_mesh
from research.data.tokenizers import CharTokenizer
from research.tasks.lm import LMTask


def task_for(args, remat: str):
    config = get_config("size=baby")
    config.model.update(dict(num_layers=args.layers, embed_dim=args.embed, num_heads=args.heads,
                             max_len=args.context, remat=remat))
    config.batch_size = args.batch
    config.mesh.update(dict(data=1))
    tok = CharTokenizer.from_text("".join(chr(ord("a") + i) for i in range(26)))
    stream = np.random.default_rng(0).integers(0, 26, 200_000).astype(np.int32)
    return config, LMTask(config, tokenizer=tok, splits={"train": stream, "validation": stream})


def measure(args, remat: str) -> dict:
    config, task = task_for(args, remat)
    report = memory_report(config, task)
    mesh = make_mesh(config.mesh)
    tx, schedule, init_fn, _, state_sh = train.build_state(task, config, mesh)
    step = train.jit_train_step(task, config, mesh, tx, schedule, state_sh)
    state = init_fn(jax.random.key(0))
    data = task.train_data(0, config.batch_size)
    times = []
    for i in range(args.steps + 1):
        batch = sharding.put_batch(next(data), sharding.batch_sharding(mesh))
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        if i:  # the first call compiles
            times.append(time.perf_counter() - t0)
    return {"remat": remat, "temp_bytes": report["temp"], "median_ms": 1e3 * statistics.median(times),
            "loss": float(metrics["loss"])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--policies", default="none,full,dots_saveable")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    rows = []
    print(f"{'remat':<16} {'temp MiB':>9} {'ms/step':>9} {'loss':>8}")
    for policy in args.policies.split(","):
        r = measure(args, policy)
        rows.append(r)
        print(f"{policy:<16} {r['temp_bytes'] / 2**20:>9.2f} {r['median_ms']:>9.1f} "
              f"{r['loss']:>8.4f}", flush=True)
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
