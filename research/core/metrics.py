"""Progress line, JSONL + TensorBoard writers, loss-curve plot, and the peak FLOP/s for MFU.

Only process 0 writes files. ``metrics.jsonl`` gets one JSON object per logged step.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax

# Dense peak FLOP/s per device by device kind (bf16 for accelerators). Override with
# ``config.peak_flops`` when your hardware differs.
ACCELERATOR_PEAKS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
}


def cpu_peak_flops() -> float:
    """fp32 peak of this host's CPU: cores x clock x FLOPs/cycle/core. FLOPs/cycle: 64 with
    AVX-512 (2 FMA units x 16 lanes x 2), 32 with AVX2+FMA (2 x 8 x 2), else 8. The clock is read
    from BogoMIPS/2 (the nominal TSC clock on x86 Linux), which is what cpuinfo reports in VMs."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return 0.0
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
    bogo = re.search(r"^bogomips\s*:\s*([\d.]+)", info, re.M | re.I)
    clock = float(bogo.group(1)) / 2 * 1e6 if bogo else float(mhz.group(1)) * 1e6 if mhz else 0.0
    return (os.cpu_count() or 1) * clock * per_cycle


def peak_flops(override: float | None = None) -> float:
    """Peak FLOP/s of all devices of this run together."""
    if override:
        return float(override)
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return cpu_peak_flops() * jax.process_count()  # simulated CPU devices share the cores
    kind = devices[0].device_kind
    for name, value in sorted(ACCELERATOR_PEAKS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return value * len(devices)
    return 0.0


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Writer:
    """Writes metrics to stdout, ``metrics.jsonl`` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class Progress:
    """Rate and ETA over the interval since the last report."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.last_step, self.last_time = total_steps, start_step, time.perf_counter()

    def interval(self, step: int) -> tuple[float, int]:
        now = time.perf_counter()
        dt, n = now - self.last_time, step - self.last_step
        self.last_step, self.last_time = step, now
        return dt, n

    def line(self, step: int, loss: float, sec_per_step: float, tokens_per_step: float,
             flops_per_step: float, peak: float) -> str:
        eta = format_seconds((self.total - step) * sec_per_step)
        mfu = f"{100 * flops_per_step / sec_per_step / peak:5.1f}%" if peak else "  n/a"
        return (f"step {step:>6}/{self.total} | loss {loss:.4f} | {1e3 * sec_per_step:7.1f} ms/step"
                f" | {tokens_per_step / sec_per_step:9.0f} tok/s | MFU {mfu} | ETA {eta}")


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(workdir: str, filename: str = "loss.png") -> str | None:
    """Train and validation loss against step, from ``metrics.jsonl``, saved as a PNG."""
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        pts = sorted({r["step"]: r[key] for r in rows if key in r}.items())
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
