"""Worker for tests/scale/test_pipeline.py, run in its own process on 8 simulated CPU devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.scale.pipeline_worker
Trains a 4-block smoke GPT (synthetic tokens, fp32) three steps on one device and as a GPipe
pipeline of 2 and 4 stages (and 2 stages x 2-way FSDP x 2-way data), 4 microbatches, and prints
one JSON line: losses, the largest parameter difference, whether the compiled step passes
activations between stages (collective-permute), the per-device bytes of the block parameters and
their share of all block bytes, the printed bubble fraction and the config errors."""
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
CASES = {"stages2": ("data_parallel", dict(pipeline=2)),
         "stages4": ("data_parallel", dict(pipeline=4)),
         "stages2_fsdp2_data2": ("fsdp", dict(pipeline=2, fsdp=2, data=2))}


def block_bytes(abstract_params, param_sh) -> tuple[int, int]:
    """(bytes of the block parameters on one device, bytes of all block parameters)."""
    if pipeline.STAGES_KEY in abstract_params:
        a, s = abstract_params[pipeline.STAGES_KEY], param_sh[pipeline.STAGES_KEY]
    else:
        keys = [k for k in abstract_params if k.startswith("layer_")]
        a, s = {k: abstract_params[k] for k in keys}, {k: param_sh[k] for k in keys}
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(a))
    return sharding.per_device_bytes(a, s), total


def run(mesh_sizes: dict, layers: int = LAYERS, micro: int = MICRO, preset="data_parallel"):
    config, task = config_and_task(preset, mesh_sizes, num_layers=layers)
    with config.unlocked():
        config.pipeline_microbatches = micro
    n = int(np.prod(list(mesh_sizes.values()) or [1]))
    mesh = make_mesh(config.mesh, devices=jax.devices()[:n])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tx, schedule, init_fn, abstract, state_sh = train.build_state(task, config, mesh)
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
    params = pipeline.unstack_layers(jax.device_get(state["params"]))
    return (losses, params, printed.getvalue(), hlo,
            block_bytes(abstract["params"], state_sh["params"]))


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    ref_losses, ref_params, _, _, _ = run({})
    report = {"reference_losses": ref_losses, "cases": {}}
    for name, (preset, mesh_sizes) in CASES.items():
        losses, params, printed, hlo, (dev_bytes, total_bytes) = run(mesh_sizes, preset=preset)
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                             params, ref_params))
        report["cases"][name] = {"losses": losses, "max_param_diff": max(diffs),
                                 "printed": printed, "block_bytes_per_device": dev_bytes,
                                 "block_bytes_total": total_bytes,
                                 "ppermute": "collective_permute" in hlo or "ppermute" in hlo}
    report["bubble_2x4"] = pipeline.bubble_fraction(2, 4)
    report["errors"] = {"layers": error_of(lambda: run(dict(pipeline=2), layers=3)),
                        "micro": error_of(lambda: run(dict(pipeline=2), micro=3))}
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
