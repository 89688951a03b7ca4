"""GPipe pipeline parallelism (research/core/pipeline.py) on 8 simulated CPU devices, one worker
process (tests/scale/pipeline_worker.py). Reference: the same 4-block GPT trained three steps on
one device without a pipeline; 2 and 4 stages with 4 microbatches (and 2 stages combined with FSDP
and data parallelism) must give the same losses and parameters (fp32, 1e-5), pass activations
between stages with ppermute, hold only their own stage's blocks (1/S of the block parameter bytes
per device, 1/(S x fsdp) with FSDP), and print the bubble fraction (S - 1) / (M + S - 1)."""
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
    assert sorted(report["cases"]) == ["stages2", "stages2_fsdp2_data2", "stages4"]
    for name, c in report["cases"].items():
        np.testing.assert_allclose(c["losses"], report["reference_losses"], rtol=1e-5,
                                   err_msg=name)
        assert c["max_param_diff"] < 1e-5, (name, c["max_param_diff"])
        assert c["ppermute"], name


def test_each_device_holds_only_its_stage(report):
    for name, split in (("stages2", 2), ("stages4", 4), ("stages2_fsdp2_data2", 4)):
        c = report["cases"][name]
        assert c["block_bytes_per_device"] * split == c["block_bytes_total"], (name, c)


def test_stack_unstack_round_trip():
    import jax
    import jax.numpy as jnp

    from research.core.pipeline import stack_layers, unstack_layers
    params = {"wte": jnp.ones((3, 2)),
              **{f"layer_{i}": {"w": jnp.full((2, 2), float(i)), "b": jnp.full((2,), -i)}
                 for i in range(4)}}
    stacked = stack_layers(params, 4, 2)
    assert sorted(stacked) == ["pipeline_stages", "wte"]
    assert stacked["pipeline_stages"]["w"].shape == (2, 2, 2, 2)
    assert float(stacked["pipeline_stages"]["w"][1, 0, 0, 0]) == 2.0  # stage 1 starts at layer 2
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


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


def test_pipelined_checkpoint_samples_and_refuses_another_layout(tmp_path, shakespeare_env):
    """A launcher run with 2 stages (4 simulated devices) saves the blocks stacked per stage;
    ``research.sample.load_model`` reads it back on one device as the per-layer model, whose
    validation loss equals the one the pipelined run logged; resuming without the pipeline is
    refused, naming the layout."""
    import jax
    import jax.numpy as jnp

    from research.core.metrics import read_jsonl
    from research.sample import load_model
    from tests.e2e import launch
    pp = ("--config.mesh.pipeline=2", "--config.mesh.data=2", "--config.model.dropout=0")
    env4 = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = launch(tmp_path, *pp, env=env4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pipeline: 2 stages" in proc.stdout
    logged = [m for m in read_jsonl(str(tmp_path / "metrics.jsonl")) if "val/loss" in m][-1]

    task, params, step = load_model(str(tmp_path))
    assert step == logged["step"] and "pipeline_stages" not in params and "layer_0" in params
    task = type(task)(task.config)  # the same model, with its data (the loaded one can only sample)
    losses = [float(task.loss(params, jax.tree.map(jnp.asarray, b), jax.random.key(0), False)[0])
              for b in task.eval_batches(task.config.get("eval_batch_size") or task.config.batch_size)]
    assert abs(np.mean(losses) - logged["val/loss"]) < 1e-4

    proc = launch(tmp_path, "--config.model.dropout=0", env=env4)
    assert proc.returncode != 0
    assert "param_layout" in proc.stdout + proc.stderr and "config.mesh.pipeline" in proc.stdout + proc.stderr
