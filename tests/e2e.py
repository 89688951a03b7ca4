"""Helpers for the end-to-end tests: run the real ``python -m research.launch`` /
``python -m research.sample`` commands in subprocesses (cwd = the repository root), as a user would.

The subprocesses inherit ``os.environ`` (so the ``shakespeare_env`` fixture's data dirs), run on
the CPU with one device unless told otherwise, and are killed on timeout. ``smoke_run`` trains the
smoke config once per test session and is shared by the test modules that only read its workdir.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = "configs/gpt_shakespeare_char.py:size=baby,smoke"
TIMEOUT_S = 300  # generous: a smoke launch takes ~10 s on a 2-core CPU


def subprocess_env(**extra: str) -> dict[str, str]:
    """``os.environ`` on the CPU, one device (XLA_FLAGS dropped unless given), plus ``extra``."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def launch_cmd(workdir, *args: str, config: str = SMOKE) -> list[str]:
    return [sys.executable, "-m", "research.launch", "--config", config,
            "--workdir", str(workdir), *args]


def run(cmd: list[str], env: dict | None = None, timeout: float = TIMEOUT_S):
    return subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def launch(workdir, *args: str, config: str = SMOKE, env: dict | None = None):
    return run(launch_cmd(workdir, *args, config=config), env=env)


def run_measure(workdir, classifier, *args: str) -> dict:
    """``experiments/diffusion/measure.py`` on a diffusion ``workdir`` scored by a classify run at
    ``classifier`` (extra flags in ``args``); asserts it exits 0 and returns its measure.json."""
    proc = run([sys.executable, "-m", "experiments.diffusion.measure", "--workdir", str(workdir),
                "--classifier", str(classifier), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(workdir) / "measure.json").read_text())


def smoke_classifier(workdir) -> Path:
    """A smoke CNN classify run at ``workdir`` (the measure script's classifier in tests)."""
    proc = launch(workdir, config="configs/cnn_fashion_mnist.py:smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(workdir)


def sample(workdir, *args: str):
    return run([sys.executable, "-m", "research.sample", "--workdir", str(workdir), *args])


def spawn(cmd: list[str], log_prefix: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in the background, stdout/stderr to ``<log_prefix>.out`` / ``.err`` (files,
    not pipes, so that a chatty process never blocks on a full pipe)."""
    out = open(f"{log_prefix}.out", "w")
    err = open(f"{log_prefix}.err", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or subprocess_env(), stdout=out, stderr=err)
    out.close()
    err.close()
    return proc


def output(log_prefix: Path) -> tuple[str, str]:
    return Path(f"{log_prefix}.out").read_text(), Path(f"{log_prefix}.err").read_text()


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` (one we started) if it is still running, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def finished_steps(workdir) -> list[int]:
    """Steps of the finished checkpoints: directories named by an integer (not Orbax's
    ``<step>.orbax-checkpoint-tmp-*`` directories of a save still in progress)."""
    ckdir = Path(workdir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    return sorted(int(p.name) for p in ckdir.iterdir() if p.is_dir() and p.name.isdigit())


def wait_for_checkpoint(proc: subprocess.Popen, workdir, min_step: int,
                        timeout: float = TIMEOUT_S) -> int:
    """Poll until ``workdir`` holds a finished checkpoint of step >= ``min_step``; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [s for s in finished_steps(workdir) if s >= min_step]
        if steps:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (rc={proc.returncode}) before a checkpoint of "
                                 f"step >= {min_step} appeared; checkpoints: "
                                 f"{finished_steps(workdir)}")
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step >= {min_step} after {timeout} s")


def metrics_rows(workdir) -> list[dict]:
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(workdir) -> dict[int, float]:
    """``step -> train/loss``; a step logged more than once (re-run after a resume) must have the
    same value every time."""
    out: dict[int, float] = {}
    for row in metrics_rows(workdir):
        step, loss = row["step"], row["train/loss"]
        assert out.setdefault(step, loss) == loss, (
            f"step {step} was logged twice with different losses: {out[step]!r} vs {loss!r}")
    return out


def assert_clean_error(proc: subprocess.CompletedProcess, prefix: str, *fragments: str) -> str:
    """A non-zero exit whose stderr holds no traceback and ends with exactly one message that
    starts with ``prefix`` and contains every fragment; returns that message."""
    assert proc.returncode not in (0, None), (proc.returncode, proc.stdout[-2000:], proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(starts) == 1, f"expected one {prefix!r} message in stderr:\n{proc.stderr}"
    message = "\n".join(lines[starts[0]:])  # a message may span lines (e.g. a list of diffs)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the message:\n{message}"
    return message


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROGRESS_RE = re.compile(
    r"step +(\d+)/(\d+) \| loss [\d.]+ \| +[\d.]+ ms/step \| +\d+ tok/s \| MFU +([\d.]+%|n/a) \| "
    r"ETA \d+:\d\d")
MESH_RE = re.compile(r"mesh \{'data': (\d+), 'fsdp': 1, 'tensor': 1, 'pipeline': 1, 'expert': 1\}")

_SMOKE: dict = {}


def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The smoke config trained once per session through the launcher (1 CPU device):
    ``(workdir, completed process)``. Needs the ``shakespeare_env`` fixture active."""
    if "run" not in _SMOKE:
        workdir = tmp_path_factory.mktemp("smoke") / "workdir"
        proc = launch(workdir)
        assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout[-3000:]}\n{proc.stderr}"
        _SMOKE["run"] = (workdir, proc)
    return _SMOKE["run"]
