"""Ahead-of-time memory report: compile a config's train step for its mesh, run nothing, and print
the bytes one device holds.

    python -m research.aot --config configs/gpt_shakespeare_char.py:size=baby \
        --config.sharding.preset=zero3 [--config.mesh.data=... ...]

Simulate N devices on a CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

Printed per device: parameters and optimizer state (from their shardings: the largest shard of
each leaf), each also as replicated would hold it, and the compiled executable's
``memory_analysis()``: arguments (the train state and the batch), outputs, temporaries
(activations kept for the backward pass, gradients, collectives' buffers) and generated code.
The last line is the report as JSON.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np

from research.core import sharding, train
from research.core.mesh import make_mesh

FIELDS = ("params", "opt_state", "argument", "output", "alias", "temp", "generated_code")


def memory_report(config, task, mesh=None) -> dict[str, Any]:
    """Per-device bytes of the train state and of the compiled train step (no step is run)."""
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    sharding.check_batch(config.batch_size // config.grad_accum_steps, mesh,
                         "config.batch_size / config.grad_accum_steps")
    tx, schedule, _, abstract, state_sh = train.build_state(task, config, mesh)
    step = train.jit_train_step(task, config, mesh, tx, schedule, state_sh)
    batch = next(task.train_data(config.seed, config.batch_size))
    sharding.check_batch_arrays(batch, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=batch_sh), batch)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    compiled = step.lower(abstract_state, abstract_batch).compile()
    ma = compiled.memory_analysis()
    repl = sharding.replicated(mesh)
    out = {
        "preset": config.sharding.get("preset", "data_parallel"),
        "mesh": dict(mesh.shape), "devices": mesh.size,
        "params": sharding.per_device_bytes(abstract["params"], state_sh["params"]),
        "opt_state": sharding.per_device_bytes(abstract["opt_state"], state_sh["opt_state"]),
        "params_replicated": sharding.per_device_bytes(
            abstract["params"], jax.tree.map(lambda _: repl, abstract["params"])),
        "opt_state_replicated": sharding.per_device_bytes(
            abstract["opt_state"], jax.tree.map(lambda _: repl, abstract["opt_state"])),
    }
    for name in ("argument", "output", "alias", "temp", "generated_code"):
        out[name] = int(getattr(ma, f"{name}_size_in_bytes", 0) or 0) if ma is not None else None
    return out


def format_report(r: dict[str, Any]) -> str:
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:10.3f} MiB"  # noqa: E731
    lines = [f"AOT memory report: preset {r['preset']}, mesh {r['mesh']} ({r['devices']} devices); "
             "bytes per device",
             f"  params          {mib(r['params'])}   (replicated: {mib(r['params_replicated'])})",
             f"  optimizer state {mib(r['opt_state'])}   (replicated: {mib(r['opt_state_replicated'])})",
             f"  compiled step: arguments {mib(r['argument'])}, outputs {mib(r['output'])}, "
             f"aliased (donated) {mib(r['alias'])}, temporaries {mib(r['temp'])}, "
             f"code {mib(r['generated_code'])}"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from research import launch, tasks
    launch.parse_flags(argv)
    if launch._CONFIG.value is None:
        from research.core.config import ConfigError
        raise ConfigError("--config=configs/X.py[:arg] is required.")
    config = launch._CONFIG.value
    task = tasks.get(config.task)(config)
    report = memory_report(config, task)
    print(format_report(report), flush=True)
    print(json.dumps(report), flush=True)
    return 0


def run_cli(argv: list[str] | None = None) -> int:
    from research.core.config import ConfigError
    try:
        return main(sys.argv if argv is None else argv)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli())
