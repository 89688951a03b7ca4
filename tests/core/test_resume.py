"""Checkpoints: Orbax round trip on disk, bit-exact resume, refusal of another model's workdir,
and survival of the previous checkpoint when a save crashes or the newest one is corrupt."""
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from research.core import checkpoint as ckpt_lib
from research.core import train
from research.core.config import ConfigError
from research.core.mesh import make_mesh
from tests.core.helpers import synthetic_task

STEPS = dict(log_every=1, eval_every=4, checkpoint_every=4)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f)}


def restore_params(workdir, config, task):
    mesh = make_mesh(config.mesh)
    _, _, _, abstract, shardings = train.build_state(task, config, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step, state, data = ck.restore(ckpt_lib.abstract_with_shardings(abstract, shardings))
    ck.close()
    return step, state, data


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    # Dropout on, so the per-step rng matters as well as the data order.
    overrides = dict(**STEPS, **{"model.dropout": 0.1, "optim.decay_steps": 12})
    config, task = synthetic_task(total_steps=12, **overrides)
    straight = str(tmp_path / "straight")
    train.run(config, task, straight)

    resumed = str(tmp_path / "resumed")
    config6, task6 = synthetic_task(total_steps=6, **overrides)  # stops at 6, checkpoint at 6
    train.run(config6, task6, resumed)
    config12, task12 = synthetic_task(total_steps=12, **overrides)
    summary = train.run(config12, task12, resumed)
    assert summary["step"] == 12

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(a[s] == b[s] for s in a), (a, b)  # exact equality, not allclose
    _, sa, da = restore_params(straight, config, task)
    _, sb, db = restore_params(resumed, config, task)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 sa["params"], sb["params"])
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 sa["opt_state"], sb["opt_state"])
    assert da == db == {"seed": config.seed, "step": 12}


def test_orbax_round_trip_on_disk_is_bitwise(tmp_path):
    config, task = synthetic_task()
    mesh = make_mesh(config.mesh)
    _, _, init_fn, abstract, shardings = train.build_state(task, config, mesh)
    state = init_fn(jax.random.key(3))
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
    ck.save(5, state, {"seed": 1, "step": 5}, {"task": "lm"}, metrics={"val/loss": 1.0})
    ck.close()
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), read_only=True)
    step, restored, data = ck.restore(ckpt_lib.abstract_with_shardings(abstract, shardings))
    assert step == 5 and data == {"seed": 1, "step": 5} and ck.read_meta(5) == {"task": "lm"}
    assert ck.best_step() == 5
    leaves_a, leaves_b = jax.tree.leaves(state), jax.tree.leaves(restored)
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_workdir_of_another_model_is_refused_and_left_untouched(tmp_path):
    config, task = synthetic_task(total_steps=4, **STEPS)
    train.run(config, task, str(tmp_path))
    before = sorted(glob.glob(str(tmp_path / "checkpoints" / "**"), recursive=True))
    other_config, other_task = synthetic_task(total_steps=8, **STEPS, **{"model.num_layers": 3})
    with pytest.raises(ConfigError, match=r"different model[\s\S]*num_layers: checkpoint 2 vs config 3"):
        train.run(other_config, other_task, str(tmp_path))
    assert sorted(glob.glob(str(tmp_path / "checkpoints" / "**"), recursive=True)) == before


def test_crash_mid_save_and_corrupt_newest_checkpoint_fall_back(tmp_path):
    config, task = synthetic_task(total_steps=8, **STEPS)
    train.run(config, task, str(tmp_path))
    ckdir = tmp_path / "checkpoints"
    # A save that died half-way leaves only a temporary directory: it must be ignored.
    shutil.copytree(ckdir / "8", ckdir / "12.orbax-checkpoint-tmp-1234")
    # And the newest finished checkpoint has a truncated array file: fall back to step 4.
    for f in glob.glob(str(ckdir / "8" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(f) and os.path.getsize(f) > 0 and "metadata" not in os.path.basename(f):
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    step, _, data = restore_params(str(tmp_path), config, task)
    assert step == 4 and data["step"] == 4
