"""Multi-host FSDP through the launcher: two processes joined by ``jax.distributed`` on 127.0.0.1
(2 simulated CPU devices each) train the smoke GPT with the ``fsdp`` preset over all 4 devices.
Reference: the same command in one process with 4 simulated devices; losses must agree (1e-5),
the mesh must be fsdp=4 over both processes' devices, and the Orbax checkpoint both
processes wrote must restore in a single process (which resumes and finishes the run)."""
from __future__ import annotations

import numpy as np

from tests.e2e import (TIMEOUT_S, finished_steps, free_port, kill, launch, launch_cmd, losses,
                       output, spawn, subprocess_env)

FSDP = ("--config.sharding.preset=fsdp", "--config.mesh.data=1", "--config.mesh.fsdp=-1")
MESH = "mesh {'data': 1, 'fsdp': 4, 'tensor': 1, 'pipeline': 1, 'expert': 1}"


def test_two_processes_fsdp_equal_one_process_and_restore_in_one(shakespeare_env, tmp_path):
    single = tmp_path / "single"
    proc = launch(single, *FSDP, env=subprocess_env(
        XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert MESH in proc.stdout, proc.stdout[-2000:]

    multi = tmp_path / "multi"  # one workdir for both processes, as on a shared filesystem
    port = free_port()
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs, logs = [], []
    try:
        for pid in range(2):
            logs.append(tmp_path / f"process{pid}")
            procs.append(spawn(launch_cmd(multi, *FSDP, f"--coordinator_address=127.0.0.1:{port}",
                                          "--num_processes=2", f"--process_id={pid}"),
                               logs[-1], env=env))
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            kill(p)
    (out0, err0), (_, err1) = output(logs[0]), output(logs[1])
    assert [p.returncode for p in procs] == [0, 0], f"{err0[-3000:]}\n-----\n{err1[-3000:]}"
    assert MESH in out0 and "devices 4 x cpu" in out0, out0[-2000:]
    want, got = losses(single), losses(multi)
    assert sorted(got) == sorted(want) == [2, 3, 4, 6]
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)
    assert finished_steps(multi) == [3, 6]

    # The checkpoint written by both processes restores in one process (4 devices, same layout)
    # and training goes on from it.
    resumed = launch(multi, *FSDP, "--config.total_steps=8", env=subprocess_env(
        XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "at step 6" in resumed.stdout, resumed.stdout[-2000:]
    assert finished_steps(multi)[-1] == 8
    assert np.isfinite(losses(multi)[8])
