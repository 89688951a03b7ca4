"""GPipe pipeline parallelism (research/core/pipeline.py) on 8 simulated CPU devices, one worker
process (tests/scale/pipeline_worker.py). Reference: the same 4-block GPT trained three steps on
one device without a pipeline; 2 and 4 stages with 4 microbatches must give the same losses and parameters (fp32, 1e-5), pass activations between stages
with ppermute, and print the bubble fraction (S - 1) / (M + S - 1)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from research.core.pipeline import bubble_fraction
from tests.e2e import REPO, subprocess_env


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.scale.pipeline_worker"], cwd=REPO,
                          env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pipeline_trains_like_one_device(report):
    assert sorted(report["cases"]) == ["stages2", "stages4"]
    for name, c in report["cases"].items():
        np.testing.assert_allclose(c["losses"], report["reference_losses"], rtol=1e-5,
                                   err_msg=name)
        assert c["max_param_diff"] < 1e-5, (name, c["max_param_diff"])
        assert c["ppermute"], name


def test_bubble_fraction_is_printed():
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(1, 8) == 0.0


def test_printed_schedule(report):
    assert "2 stages x 2 blocks, 4 microbatches (GPipe), bubble fraction 0.200" in \
        report["cases"]["stages2"]["printed"]
    assert "4 stages x 1 blocks, 4 microbatches (GPipe), bubble fraction 0.429" in \
        report["cases"]["stages4"]["printed"]


def test_layers_and_microbatches_that_do_not_divide_fail_clearly(report):
    e = report["errors"]
    assert "num_layers=3" in e["layers"] and "pipeline=2" in e["layers"], e
    assert "pipeline_microbatches=3" in e["micro"], e
