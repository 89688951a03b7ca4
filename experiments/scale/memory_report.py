"""Ahead-of-time memory report of the sharding presets: per-device bytes of parameters, optimizer
state and the compiled train step's temporaries on N simulated devices, without running a step.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 nice -n 10 \
        python -m experiments.scale.memory_report [--config configs/gpt_shakespeare_char.py:size=baby]

Every preset (``research.core.sharding.PRESETS``) on a mesh of all devices (data-parallel presets:
data=N; ``fsdp``: fsdp=N; ``tensor``: tensor=2 x data=N/2; ``fsdp_tensor``: fsdp=N/2 x tensor=2)
goes through ``research.aot.memory_report`` (``compiled.memory_analysis()``). The table gives MiB
per device and the fraction of the replicated parameters + optimizer state each preset keeps.
One preset at a time: ``python -m research.aot --config ... --config.sharding.preset=zero3``.
"""
from __future__ import annotations

import argparse
import json

import jax

from research import tasks
from research.aot import memory_report
from ml_collections.config_flags import config_flags

MESHES = {
    "data_parallel": lambda n: dict(data=n),
    "zero1": lambda n: dict(data=n),
    "zero2": lambda n: dict(data=n),
    "zero3": lambda n: dict(data=n),
    "fsdp": lambda n: dict(data=1, fsdp=n),
    "tensor": lambda n: dict(data=n // 2, tensor=2),
    "fsdp_tensor": lambda n: dict(data=1, fsdp=n // 2, tensor=2),
}


def load(path: str, preset: str, mesh: dict, batch: int | None = None):
    config = config_flags.ConfigFileFlagParser(name="config").parse(path)
    with config.unlocked():
        config.sharding.preset = preset
        config.mesh.update({**dict(data=1, fsdp=1, tensor=1, pipeline=1, expert=1), **mesh})
        if batch:
            config.batch_size = batch
    return config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/gpt_shakespeare_char.py:size=baby")
    p.add_argument("--presets", default=",".join(MESHES))
    p.add_argument("--batch", type=int, default=16, help="global batch (must divide by N)")
    args = p.parse_args()
    n = jax.device_count()
    mib = lambda b: b / 2**20  # noqa: E731
    rows, task = [], None
    print(f"{args.config} on {n} devices; MiB per device")
    print(f"{'preset':<14} {'mesh':<22} {'params':>8} {'opt':>8} {'p+o / repl':>10} "
          f"{'args':>8} {'temp':>8}")
    for preset in args.presets.split(","):
        config = load(args.config, preset, MESHES[preset](n), args.batch)
        task = task or tasks.get(config.task)(config)
        r = memory_report(config, task)
        full = r["params_replicated"] + r["opt_state_replicated"]
        r["fraction_of_replicated"] = (r["params"] + r["opt_state"]) / full
        rows.append(r)
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1)
        print(f"{preset:<14} {mesh:<22} {mib(r['params']):>8.3f} {mib(r['opt_state']):>8.3f} "
              f"{r['fraction_of_replicated']:>10.3f} {mib(r['argument']):>8.3f} "
              f"{mib(r['temp']):>8.3f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
