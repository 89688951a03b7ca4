"""Time one ClassifyTask train step (forward + backward + AdamW) for model variants on this CPU.

    python experiments/vision/bench_step.py [--steps 20] [--batch 128] [variant ...]

Prints, per variant: parameters, wall ms/step and process CPU ms/step (user + sys; on a loaded
machine the CPU time is the steadier number: wall ~ CPU / cores in use when the machine is idle).
Variants are ``name:key=value,...`` overrides of configs/vit_fashion_mnist.py's model
(``cnn`` uses configs/cnn_fashion_mnist.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from research.core import optim  # noqa: E402
from research.core.config import sibling_config  # noqa: E402
from research.core.train import make_train_step  # noqa: E402
from research.tasks.classify import ClassifyTask  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "vit_fashion_mnist.py")
DEFAULT = ["vit", "vit_p7:patch_size=7", "vit_e64:embed_dim=64,num_heads=2", "cnn"]


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def bench(variant: str, steps: int, batch: int) -> None:
    name, _, overrides = variant.partition(":")
    cfg_name = "cnn_fashion_mnist" if name.startswith("cnn") else "vit_fashion_mnist"
    config = sibling_config(CONFIGS, cfg_name).get_config()
    for item in filter(None, overrides.split(",")):
        k, _, v = item.partition("=")
        config.model[k] = parse_value(v)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2048, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 2048).astype(np.int32)
    task = ClassifyTask(config, splits={"train": (images, labels), "test": (images, labels)})
    tx, schedule = optim.build(config)
    params = jax.jit(task.init)(jax.random.key(0))
    state = {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params,
             "opt_state": tx.init(params), "rng": jax.random.key(1)}
    step = jax.jit(make_train_step(task, tx, schedule, 1), donate_argnums=0)
    data = task.train_data(0, batch)
    state, m = step(state, next(data))
    jax.block_until_ready(m)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, m = step(state, next(data))
        m["loss"].block_until_ready()
    wall, cpu = (time.perf_counter() - w0) / steps, (time.process_time() - c0) / steps
    print(f"{variant:40s} params {task.n_params:>9,} | wall {1e3 * wall:7.1f} ms/step | "
          f"cpu {1e3 * cpu:7.1f} ms/step | {task.flops_per_example * batch / 1e9:6.2f} GFLOP/step",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("variants", nargs="*", default=DEFAULT)
    a = p.parse_args()
    print(f"load average {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
    for v in a.variants:
        bench(v, a.steps, a.batch)
    print(f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
