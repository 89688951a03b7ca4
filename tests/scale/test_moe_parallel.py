"""Expert parallelism on 8 simulated CPU devices (one worker process, tests/scale/moe_worker.py).
Reference: the same MoE GPT trained three steps on one device; with its experts split over the
``expert`` mesh axis (top-1 over expert=8; top-2 over fsdp=2 x expert=4 with the fsdp preset) the
losses and parameters must agree to 1e-5 (fp32), the expert kernels must really be split over
``expert`` and the compiled step (top-1 case) must move tokens with an all-to-all."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.e2e import REPO, subprocess_env
from tests.scale.moe_worker import CASES


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.scale.moe_worker"], cwd=REPO,
                          env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_expert_parallel_trains_like_one_device(report):
    assert sorted(report) == sorted([name for name, *_ in CASES] + ["error"])
    for name, r in report.items():
        if name == "error":
            continue
        np.testing.assert_allclose(r["losses"], r["reference_losses"], rtol=1e-5, err_msg=name)
        assert r["max_param_diff"] < 1e-5, (name, r["max_param_diff"])


def test_experts_are_split_over_the_expert_axis_with_an_all_to_all(report):
    top1, top2 = report["top1_expert8"], report["top2_fsdp2_expert4"]
    assert top1["param_specs"]["['layer_0']['moe']['w_in']"] == "('expert', None, None)"
    assert top1["param_specs"]["['layer_0']['moe']['w_out']"] == "('expert', None, None)"
    assert top2["param_specs"]["['layer_0']['moe']['w_in']"] == "('expert', 'fsdp', None)"
    assert top1["all_to_all"]  # checked for the first case only (a second compilation)


def test_experts_that_do_not_divide_the_expert_axis_fail_naming_the_kernel(report):
    e = report["error"]
    assert "['layer_0']['moe']['w_in']" in e and "'expert'" in e and "(6, 32, 128)" in e, e
    assert "expert=8" in e, e
