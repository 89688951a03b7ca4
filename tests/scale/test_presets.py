"""Sharding presets on 8 simulated CPU devices (one worker process: the device count is fixed per
process). Reference: the same three training steps on one device; every preset and a 2x2x2
data x fsdp x tensor mesh must give the same losses and parameters (fp32, 1e-5). Also: the state
really is laid out as the preset says, non-dividing shardings fail naming the tensor, and the AOT
report shows ZeRO-3 / ZeRO-1 holding 1/8 of the replicated bytes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.e2e import REPO, subprocess_env
from tests.scale.presets_worker import CASES

NONE = "(None, None)"


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.scale.presets_worker"], cwd=REPO,
                          env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def case(report, preset):
    return next(v for v in report["cases"].values() if v["preset"] == preset)


def test_every_preset_trains_like_one_device(report):
    assert len(report["cases"]) == len(CASES)
    for name, c in report["cases"].items():
        np.testing.assert_allclose(c["losses"], report["reference_losses"], rtol=1e-5, err_msg=name)
        assert c["max_param_diff"] < 1e-5, (name, c["max_param_diff"])


def test_zero1_and_zero2_shard_the_optimizer_state_not_the_params(report):
    for preset in ("zero1", "zero2"):
        c = case(report, preset)
        assert all("data" not in s and "fsdp" not in s for s in c["param_specs"].values())
        mu = {k: s for k, s in c["opt_specs"].items() if ".mu" in k}
        assert mu and all("('data', 'fsdp')" in s for s in mu.values()), mu
    dp = case(report, "data_parallel")
    assert all(set(s) <= set("(None, )") for s in list(dp["param_specs"].values())
               + list(dp["opt_specs"].values()))


def test_zero3_and_fsdp_shard_params_on_embed(report):
    z3, fsdp = case(report, "zero3")["param_specs"], case(report, "fsdp")["param_specs"]
    key = "['layer_0']['mlp']['fc_out']['kernel']"
    assert z3[key] == "(None, ('data', 'fsdp'))" and fsdp[key] == "(None, 'fsdp')"
    assert all("fsdp" in s for s in z3.values())  # every parameter has an embed dimension


def test_tensor_parallel_is_megatron(report):
    t = case(report, "tensor")["param_specs"]
    assert t["['layer_0']['attn']['query']['kernel']"] == "(None, 'tensor', None)"  # column
    assert t["['layer_0']['attn']['key']['kernel']"] == "(None, 'tensor', None)"
    assert t["['layer_0']['mlp']['fc_in']['kernel']"] == "(None, 'tensor')"           # column
    assert t["['layer_0']['attn']['out']['kernel']"] == "('tensor', None, None)"      # row
    assert t["['layer_0']['mlp']['fc_out']['kernel']"] == "('tensor', None)"          # row
    ft = case(report, "fsdp_tensor")["param_specs"]
    assert ft["['layer_0']['mlp']['fc_in']['kernel']"] == "('fsdp', 'tensor')"


def test_non_dividing_shardings_fail_naming_the_tensor(report):
    e = report["errors"]
    assert "['layer_0']['attn']['key']['kernel']" in e["heads"] and "tensor=8" in e["heads"]
    assert "'kv_heads'" in e["kv_heads"] and "(32, 2, 8)" in e["kv_heads"]
    assert "num_kv_heads" in e["kv_heads"]
    assert "['inputs']" in e["batch"] and "(12, 32)" in e["batch"] and "data=8" in e["batch"]
    assert "'hidden'" in e["activation"] and "(4, 32)" in e["activation"]


def test_aot_report_zero3_and_zero1_hold_an_eighth(report):
    a = report["aot"]
    dp, z1, z3 = a["data_parallel"], a["zero1"], a["zero3"]
    full = dp["params"] + dp["opt_state"]
    assert dp["params"] == dp["params_replicated"] and dp["opt_state"] == dp["opt_state_replicated"]
    assert z3["params"] + z3["opt_state"] <= full / 8 * 1.1, z3
    assert z1["opt_state"] <= dp["opt_state"] / 8 * 1.1 and z1["params"] == dp["params"], z1
    # The compiled executable's arguments (state + batch) shrink accordingly.
    assert z3["argument"] < z1["argument"] < dp["argument"], (z3, z1, dp)
