"""Worker for tests/scale/test_moe_parallel.py, run in its own process on 8 simulated devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.scale.moe_worker
Trains a one-block MoE GPT (synthetic tokens, fp32) three steps on one device and with its experts
split over the ``expert`` mesh axis, and prints one JSON line with the losses, the largest
parameter difference, the experts' parameter specs and whether the step has an all-to-all."""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from research.core import sharding, train
from research.core.mesh import make_mesh
from tests.scale.presets_worker import config_and_task, error_of, spec_strings, train_steps

# (name, model options, preset, mesh)
CASES = [
    ("top1_expert8", dict(moe_experts=8, moe_top_k=1), "data_parallel", dict(expert=8)),
    ("top2_fsdp2_expert4", dict(moe_experts=4, moe_top_k=2, moe_capacity_factor=1.0),
     "fsdp", dict(fsdp=2, expert=4)),
]


def has_all_to_all(preset, mesh_sizes, model) -> bool:
    config, task = config_and_task(preset, mesh_sizes, num_layers=1, **model)
    mesh = make_mesh(config.mesh)
    tx, schedule, _, abstract, state_sh = train.build_state(task, config, mesh)
    step = train.jit_train_step(task, config, mesh, tx, schedule, state_sh)
    batch = next(task.train_data(0, config.batch_size))
    bsh = sharding.batch_sharding(mesh)
    args = (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, state_sh),
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bsh), batch))
    return "all-to-all" in step.lower(*args).compile().as_text()


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    report = {}
    for name, model, preset, mesh_sizes in CASES:
        ref_losses, ref_state = train_steps("data_parallel", {}, jax.devices()[:1], **model)
        losses, state = train_steps(preset, mesh_sizes, jax.devices(), **model)
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                             jax.device_get(state["params"]),
                                             jax.device_get(ref_state["params"])))
        report[name] = {"reference_losses": ref_losses, "losses": losses,
                        "max_param_diff": max(diffs), "param_specs": spec_strings(state["params"]),
                        # (compiled once more: only for the first case, to keep the test short)
                        "all_to_all": name != CASES[0][0] or has_all_to_all(preset, mesh_sizes,
                                                                            model)}
    # 6 experts cannot split over expert=8: one error naming the kernel, never a replication.
    config, task = config_and_task("data_parallel", dict(expert=8), num_layers=1, moe_experts=6)
    report["error"] = error_of(lambda: train.build_state(task, config, make_mesh(config.mesh)))
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
