"""Worker for tests/scale/test_pipeline.py, run in its own process on 8 simulated CPU devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.scale.pipeline_worker
Trains a 4-block smoke GPT (synthetic tokens, fp32) three steps on one device and as a GPipe
pipeline of 2 and 4 stages, 4 microbatches, and prints one JSON
line: losses, the largest parameter difference, whether the compiled step passes activations
between stages (collective-permute), the printed bubble fraction and the config errors."""
from __future__ import annotations

import contextlib
import io
import json
import sys

import jax
import numpy as np

from research.core import pipeline, sharding, train
from research.core.mesh import make_mesh
from tests.scale.presets_worker import config_and_task, error_of

LAYERS, MICRO, STEPS = 4, 4, 3
CASES = {"stages2": dict(pipeline=2), "stages4": dict(pipeline=4)}


def run(mesh_sizes: dict, layers: int = LAYERS, micro: int = MICRO):
    config, task = config_and_task("data_parallel", mesh_sizes, num_layers=layers)
    with config.unlocked():
        config.pipeline_microbatches = micro
    n = int(np.prod(list(mesh_sizes.values()) or [1]))
    mesh = make_mesh(config.mesh, devices=jax.devices()[:n])
    tx, schedule, init_fn, _, state_sh = train.build_state(task, config, mesh)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        step = train.jit_train_step(task, config, mesh, tx, schedule, state_sh)
    state = init_fn(jax.random.key(0))
    data = task.train_data(0, config.batch_size)
    losses, hlo = [], ""
    for i in range(STEPS):
        batch = sharding.put_batch(next(data), sharding.batch_sharding(mesh))
        if i == 0:
            hlo = step.lower(state, batch).as_text()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), printed.getvalue(), hlo


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    ref_losses, ref_params, _, _ = run({})
    report = {"reference_losses": ref_losses, "cases": {}}
    for name, mesh_sizes in CASES.items():
        losses, params, printed, hlo = run(mesh_sizes)
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                             params, ref_params))
        report["cases"][name] = {"losses": losses, "max_param_diff": max(diffs),
                                 "printed": printed,
                                 "ppermute": "collective_permute" in hlo or "ppermute" in hlo}
    report["bubble_2x4"] = pipeline.bubble_fraction(2, 4)
    report["errors"] = {"layers": error_of(lambda: run(dict(pipeline=2), layers=3)),
                        "micro": error_of(lambda: run(dict(pipeline=2), micro=3))}
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
