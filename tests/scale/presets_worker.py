"""Worker for tests/scale/test_presets.py, run in its own process on 8 simulated CPU devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.scale.presets_worker
Trains the smoke GPT (synthetic tokens, fp32) three steps on one device and under each sharding
preset, and prints one JSON line: per preset the largest loss/param differences to the
one-device run and the specs the state actually has."""
from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding

from research.aot import memory_report
from research.core import sharding, train
from research.core.config import ConfigError
from research.core.mesh import make_mesh
from tests.core.helpers import synthetic_task

# (preset, mesh) pairs: every preset, and a 2x2x2 data x fsdp x tensor combination.
CASES = [
    ("data_parallel", dict(data=8)),
    ("zero1", dict(data=8)),
    ("zero2", dict(data=4, fsdp=2)),
    ("zero3", dict(data=8)),
    ("fsdp", dict(data=2, fsdp=4)),
    ("tensor", dict(data=4, tensor=2)),
    ("fsdp_tensor", dict(data=2, fsdp=2, tensor=2)),
]
STEPS = 3


def config_and_task(preset: str, mesh: dict, **model):
    overrides = {"sharding.preset": preset, "mesh": {"data": 1, "fsdp": 1, "tensor": 1,
                                                     "pipeline": 1, "expert": 1, **mesh}}
    overrides.update({f"model.{k}": v for k, v in model.items()})
    config, task = synthetic_task(**overrides)
    return config, task


def train_steps(preset: str, mesh_sizes: dict, devices, **model):
    model = {"num_layers": 1, **model}  # one block keeps the eight compilations short
    config, task = config_and_task(preset, mesh_sizes, **model)
    mesh = make_mesh(config.mesh, devices=devices)
    tx, schedule, init_fn, _, state_sh = train.build_state(task, config, mesh)
    step = train.jit_train_step(task, config, mesh, tx, schedule, state_sh)
    state = init_fn(jax.random.key(0))
    data = task.train_data(0, config.batch_size)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, sharding.put_batch(next(data), sharding.batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
    return losses, state


def spec_strings(tree) -> dict[str, str]:
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(getattr(x, "sharding", None), NamedSharding):
            out[jax.tree_util.keystr(path)] = str(tuple(x.sharding.spec))
    return out


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    ref_losses, ref_state = train_steps("data_parallel", {}, jax.devices()[:1])
    ref_params = jax.device_get(ref_state["params"])
    report = {"reference_losses": ref_losses, "cases": {}}
    for preset, mesh_sizes in CASES:
        losses, state = train_steps(preset, mesh_sizes, jax.devices())
        params = jax.device_get(state["params"])
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params,
                                             ref_params))
        mu = state["opt_state"]
        report["cases"][f"{preset}:{mesh_sizes}"] = {
            "preset": preset, "losses": losses,
            "max_param_diff": max(diffs),
            "max_loss_diff": float(np.max(np.abs(np.subtract(losses, ref_losses)))),
            "param_specs": spec_strings(state["params"]),
            "opt_specs": spec_strings(mu),
        }
    report["errors"] = errors()
    report["aot"] = {p: memory_report(*config_and_task(p, {"data": 8}, num_layers=1))
                     for p in ("data_parallel", "zero1", "zero3")}
    print(json.dumps(report))


def error_of(fn) -> str:
    try:
        fn()
    except ConfigError as e:
        return str(e)
    return "no error"


def errors() -> dict[str, str]:
    """Messages for shardings that cannot divide (never a silent replication)."""
    def build(preset, mesh_sizes, **model):
        config, task = config_and_task(preset, mesh_sizes, **model)
        train.build_state(task, config, make_mesh(config.mesh))

    def activation():
        mesh = make_mesh(dict(data=8))
        rules = sharding.PRESETS["data_parallel"].params
        jax.jit(sharding.with_activation_context(
            lambda x: sharding.constrain(x, ("act_batch", "act_embed"), "hidden"), mesh, rules)
        ).lower(jax.ShapeDtypeStruct((4, 32), np.float32))

    return {
        # 2 query heads over tensor=8
        "heads": error_of(lambda: build("tensor", dict(tensor=8))),
        # GQA: 4 query heads divide over tensor=4, 2 key/value heads do not
        "kv_heads": error_of(lambda: build("tensor", dict(data=2, tensor=4), num_heads=4,
                                           num_kv_heads=2)),
        "batch": error_of(lambda: sharding.check_batch_arrays(
            {"inputs": np.zeros((12, 32), np.int32)}, make_mesh(dict(data=8)))),
        "activation": error_of(activation),
    }


if __name__ == "__main__":
    sys.exit(main())
