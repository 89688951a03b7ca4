"""Stopping a launcher run with ``kill -9`` or SIGTERM and running the same command again gives
the same per-step training losses, bit for bit, as a run that was never interrupted (dropout on,
so the per-step rng matters as well as the data order and the optimizer state)."""
from __future__ import annotations

import re
import signal

import pytest

from tests.e2e import (finished_steps, kill, launch, launch_cmd, losses,
                       output, spawn, wait_for_checkpoint)

TOTAL = 40
ARGS = (f"--config.total_steps={TOTAL}", "--config.checkpoint_every=5", "--config.log_every=1",
        "--config.eval_every=20", f"--config.optim.decay_steps={TOTAL}",
        "--config.model.dropout=0.1")
KILL_AFTER = 10  # stop once a checkpoint of at least this step is finished


@pytest.fixture(scope="module")
def reference(shakespeare_env, tmp_path_factory) -> dict[int, float]:
    """``step -> train/loss`` of the uninterrupted run."""
    workdir = tmp_path_factory.mktemp("resume_reference")
    proc = launch(workdir, *ARGS)
    assert proc.returncode == 0, proc.stderr
    ref = losses(workdir)
    assert sorted(ref) == list(range(1, TOTAL + 1))
    return ref


def interrupt(tmp_path, sig: signal.Signals):
    """Start the run, wait for a finished checkpoint >= KILL_AFTER, send ``sig``; returns the
    stopped process, its stdout and stderr, and the checkpoint step seen before the signal."""
    workdir = tmp_path / "workdir"
    logs = tmp_path / f"first_{sig.name}"
    proc = spawn(launch_cmd(workdir, *ARGS), logs)
    try:
        seen = wait_for_checkpoint(proc, workdir, KILL_AFTER)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        kill(proc)
    out, err = output(logs)
    return workdir, proc, out, err, seen


def resume_and_compare(workdir, reference, resume_step: int | None, min_resume: int):
    proc = launch(workdir, *ARGS)
    assert proc.returncode == 0, proc.stderr
    resumed = re.findall(r"Resumed from \S+ at step (\d+)\.", proc.stdout)
    assert len(resumed) == 1, proc.stdout
    step = int(resumed[0])
    assert step >= min_resume and (resume_step is None or step == resume_step)
    got = losses(workdir)  # also checks that steps run twice logged identical losses
    assert sorted(got) == list(range(1, TOTAL + 1))
    diffs = {s: (got[s], reference[s]) for s in got if got[s] != reference[s]}
    assert not diffs, f"losses differ from the uninterrupted run (resumed at {step}): {diffs}"
    assert finished_steps(workdir)[-1] == TOTAL
    return step


def test_resume_after_kill_9_equals_uninterrupted_run(reference, tmp_path):
    workdir, proc, out, err, seen = interrupt(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert max(r for r in losses(workdir)) < TOTAL, "the run finished before it was killed"
    resume_and_compare(workdir, reference, None, min_resume=seen)


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes_exactly(reference, tmp_path):
    workdir, proc, out, err, seen = interrupt(tmp_path, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    stopped = re.findall(r"Stopped by signal 15 at step (\d+); checkpoint saved\.", out)
    assert len(stopped) == 1, out
    step = int(stopped[0])
    assert seen <= step < TOTAL
    assert finished_steps(workdir)[-1] == step  # saved at the step it stopped at
    assert max(losses(workdir)) == step  # the step it stopped at was logged
    resume_and_compare(workdir, reference, step, min_resume=step)

