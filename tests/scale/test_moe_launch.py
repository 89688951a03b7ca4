"""The MoE config end to end through the launcher, with its 4 experts split over 4 simulated
devices (expert parallelism): it trains, the loss falls, and the MoE metrics (load-balancing loss,
z-loss, dropped fraction) are logged beside the cross-entropy."""
from __future__ import annotations

import json

from tests.e2e import launch, losses, metrics_rows, subprocess_env


def test_moe_smoke_run_with_expert_parallelism(shakespeare_env, tmp_path):
    workdir = tmp_path / "moe"
    proc = launch(workdir, config="configs/moe_shakespeare_char.py:smoke",
                  env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'expert': 4" in proc.stdout and "devices 4 x cpu" in proc.stdout, proc.stdout[-2000:]
    got = losses(workdir)
    assert sorted(got) == [2, 3, 4, 6] and got[6] < got[2], got
    row = metrics_rows(workdir)[-1]
    assert 0.0 <= row["train/moe_dropped_fraction"] < 0.5, row
    assert 0.0 < row["train/moe_aux_loss"] < 0.1 and row["train/moe_z_loss"] > 0, row
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 6 and "val/moe_aux_loss" in summary
