"""The same launcher command across processes and devices: two processes joined by
``jax.distributed`` on 127.0.0.1 (gloo CPU collectives), and 8 simulated CPU devices, each train
the smoke config to the same losses as the single-process, single-device run."""
from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest

from tests.e2e import (MESH_RE, PROGRESS_RE, TIMEOUT_S, finished_steps, free_port, kill, launch,
                       launch_cmd, losses, output, smoke_run, spawn, subprocess_env,
                       wait_for_checkpoint)


@pytest.fixture(scope="module")
def single(shakespeare_env, tmp_path_factory) -> dict[int, float]:
    workdir, _ = smoke_run(tmp_path_factory)
    return losses(workdir)


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == [2, 3, 4, 6]
    steps = sorted(want)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5, atol=0)


def test_two_processes_train_like_one(single, tmp_path):
    workdir = tmp_path / "workdir"  # one workdir for all processes, as on a shared filesystem
    port = free_port()
    procs, logs = [], []
    try:
        for pid in range(2):
            logs.append(tmp_path / f"process{pid}")
            procs.append(spawn(launch_cmd(workdir, f"--coordinator_address=127.0.0.1:{port}",
                                          "--num_processes=2", f"--process_id={pid}"), logs[-1]))
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            kill(proc)
    (out0, err0), (out1, err1) = output(logs[0]), output(logs[1])
    assert [p.returncode for p in procs] == [0, 0], f"{err0[-3000:]}\n-----\n{err1[-3000:]}"
    assert "Traceback" not in err0 + err1

    # Process 0 reports: one mesh over both processes' devices, progress lines and the summary.
    assert [int(d) for d in MESH_RE.findall(out0)] == [2], out0
    assert "devices 2 x cpu" in out0
    assert [int(s) for s, _, _ in PROGRESS_RE.findall(out0)] == [2, 3, 4, 6]
    assert json.loads(out0.strip().splitlines()[-1])["step"] == 6
    # Process 1 trains but neither prints progress nor writes metrics.
    assert PROGRESS_RE.findall(out1) == []

    assert_same_losses(losses(workdir), single)
    assert finished_steps(workdir) == [3, 6]
    assert json.loads((workdir / "summary.json").read_text())["step"] == 6


def test_eight_devices_data_parallel_train_like_one(single, tmp_path):
    workdir = tmp_path / "workdir"
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = launch(workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(d) for d in MESH_RE.findall(proc.stdout)] == [8], proc.stdout
    assert "devices 8 x cpu" in proc.stdout
    assert_same_losses(losses(workdir), single)
    assert finished_steps(workdir) == [3, 6]


def test_sigterm_to_one_process_stops_both_at_the_same_step(shakespeare_env, tmp_path):
    """A signal reaching only one process must not leave the other waiting forever in the next
    step's collectives: the processes agree on stopping (at a log step) and both save and exit."""
    workdir = tmp_path / "workdir"
    port = free_port()
    args = ("--config.total_steps=100000", "--config.log_every=5", "--config.checkpoint_every=20",
            "--config.eval_every=100000", "--config.optim.decay_steps=100000")
    procs, logs = [], []
    try:
        for pid in range(2):
            logs.append(tmp_path / f"process{pid}")
            procs.append(spawn(launch_cmd(workdir, *args, f"--coordinator_address=127.0.0.1:{port}",
                                          "--num_processes=2", f"--process_id={pid}"), logs[-1]))
        wait_for_checkpoint(procs[0], workdir, 20)
        procs[1].send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            kill(proc)
    (out0, err0), (_, err1) = output(logs[0]), output(logs[1])
    assert [p.returncode for p in procs] == [0, 0], f"{err0[-3000:]}\n-----\n{err1[-3000:]}"
    stopped = re.findall(r"Stopped by signal \(on another process\) at step (\d+);", out0)
    assert len(stopped) == 1, out0[-2000:]
    step = int(stopped[0])
    assert step % 5 == 0 and step in finished_steps(workdir)
