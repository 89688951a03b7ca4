"""The clip task: a launcher smoke run and its evaluation report (plots, metrics), LiT (a locked
image tower loaded from a run's checkpoint), the seeded caption batches, and config errors."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.clip_fashion_mnist import get_config
from research.core import optim
from research.core.config import ConfigError
from research.data import captions as cap
from research.tasks.clip import ClipTask
from tests import e2e

CONFIG = "configs/clip_fashion_mnist.py:smoke"


def tiny_splits(n=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.int32)
    return {"train": (images, labels), "test": (images[:32], labels[:32])}


def smoke_config(**model):
    c = get_config("smoke")
    with c.unlocked():
        c.model.update(model)
    return c


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory, fashion_mnist_env):
    workdir = tmp_path_factory.mktemp("clip") / "smoke"
    proc = e2e.launch(workdir, config=CONFIG)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    return workdir


def test_launcher_smoke_run_and_report(smoke_workdir):
    rows = e2e.metrics_rows(smoke_workdir)
    val = [r for r in rows if "val/zero_shot_accuracy" in r]
    assert [r["step"] for r in val] == [3, 6]
    for key in ("val/loss", "val/i2t_recall@1", "val/t2i_recall@5"):
        assert np.isfinite(val[-1][key])
    assert 0.0 <= val[-1]["val/zero_shot_accuracy"] <= 1.0
    proc = subprocess.run([sys.executable, "-m", "research.tasks.clip", "--workdir",
                           str(smoke_workdir)], cwd=e2e.REPO, env=e2e.subprocess_env(),
                          capture_output=True, text=True, timeout=e2e.TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["step"] == 6
    for key in ("eval/zero_shot_accuracy", "eval/i2t_recall@1", "eval/t2i_recall@5",
                "eval/i2t_class_recall@1", "eval/linear_probe_accuracy"):
        assert 0.0 <= report[key] <= 1.0, key
    # The in-loop zero-shot accuracy (batched) and the report's (all at once) agree.
    assert report["eval/zero_shot_accuracy"] == pytest.approx(val[-1]["val/zero_shot_accuracy"],
                                                              abs=1e-3)
    for name in ("similarity.png", "accuracy.png", "evaluations.jsonl"):
        assert (smoke_workdir / name).stat().st_size > 0, name


def test_probe_sweep_picks_l2_on_training_validation(smoke_workdir):
    """``experiments/clip/probe_sweep.py`` on the smoke run: every l2 of the grid has a validation
    accuracy, the chosen one is the best of them, and the test accuracy is a fraction of 10k."""
    proc = subprocess.run([sys.executable, "-m", "experiments.clip.probe_sweep", "--workdir",
                           str(smoke_workdir), "--l2", "1e-4,1e-2", "--steps", "20"],
                          cwd=e2e.REPO, env=e2e.subprocess_env(), capture_output=True, text=True,
                          timeout=e2e.TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((smoke_workdir / "probe_sweep.json").read_text())
    assert res["fit_examples"] == 55000 and res["val_examples"] == 5000
    for kind in ("pooled_features", "embedding"):
        r = res[kind]
        assert set(r["val_accuracy"]) == {"0.0001", "0.01"}
        assert r["val_accuracy"][f"{r['best_l2']:g}"] == max(r["val_accuracy"].values())
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["test_accuracy"] * 10000 == pytest.approx(round(r["test_accuracy"] * 10000))


def test_lit_loads_and_locks_the_image_tower(smoke_workdir):
    """LiT from the smoke run's checkpoint: the image tower equals the checkpoint's and stays
    unchanged by a train step (no optimizer state for it); the text tower and projections train."""
    from research.tasks.clip import load_clip
    _, trained, _ = load_clip(str(smoke_workdir))
    task = ClipTask(smoke_config(lit=str(smoke_workdir)), splits=tiny_splits())
    params = nn.meta.unbox(task.init(jax.random.key(1)))
    jax.tree.map(np.testing.assert_array_equal, params["image_encoder"],
                 trained["image_encoder"])
    mask = task.trainable(params)
    assert not any(jax.tree.leaves(mask["image_encoder"]))
    assert all(jax.tree.leaves(mask["text_encoder"])) and mask["image_proj"]["kernel"]
    tx, _ = optim.build(task.config, task.trainable)
    batch = next(task.train_data(0, 16))
    grads = jax.grad(lambda p: task.loss(p, batch, jax.random.key(0))[0])(params)
    assert not any(np.any(g != 0) for g in jax.tree.leaves(grads["image_encoder"]))
    # Two optimizer steps: the warmup schedule's learning rate is 0 at step 0.
    new, state = params, tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, new)
        new = jax.tree.map(lambda p, u: p + u, new, updates)
    jax.tree.map(np.testing.assert_array_equal, new["image_encoder"], params["image_encoder"])
    assert not np.array_equal(new["text_proj"]["kernel"], params["text_proj"]["kernel"])
    assert task.meta()["model"]["lit"] == str(smoke_workdir)


def test_lit_without_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        ClipTask(smoke_config(lit=str(tmp_path)), splits=tiny_splits())


def test_caption_batches_seeded_and_resumable():
    task = ClipTask(smoke_config(), splits=tiny_splits())
    a, b = task.train_data(3, 8), task.train_data(3, 8)
    first = [next(a) for _ in range(3)]
    b.set_state(a.get_state())
    assert b.get_state()["step"] == 3
    c = task.train_data(3, 8)
    for x, y in zip(first, [next(c) for _ in range(3)]):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["images"], y["images"])
    words = [task.tokenizer.decode(t) for t in first[0]["tokens"]]
    for text, label in zip(words, first[0]["labels"]):
        assert cap.CLASS_PHRASES[label] in text  # class words are never dropped
    # Eval captions come from the held-out templates only.
    ev = task.eval_batches(16)
    assert len(ev) == 2
    texts = {task.tokenizer.decode(t) for t in ev[0]["tokens"]}
    train_like = {task.tokenizer.decode(task.tokenizer.encode(cap.fill(t, c)))
                  for t in cap.TRAIN_TEMPLATES for c in cap.CLASS_PHRASES}
    assert texts.isdisjoint(train_like)


@pytest.mark.parametrize("classes,match", [
    (("coat", ""), "empty"), (("coat", "bag", "Coat"), "duplicates"),
    (("coat", "jacket"), "no word in the caption vocabulary")])
def test_zero_shot_class_list_errors(classes, match):
    config = smoke_config()
    with config.unlocked():
        config.zero_shot.classes = classes
    with pytest.raises(ConfigError, match=match):
        ClipTask(config, splits=tiny_splits())


def test_bad_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="config.model.loss"):
        ClipTask(smoke_config(loss="hinge"), splits=tiny_splits())


def test_wrong_image_shape_names_the_expected_shape():
    task = ClipTask(smoke_config(), splits=tiny_splits())
    params = nn.meta.unbox(task.init(jax.random.key(0)))
    tokens = task.prompt_tokens[:2]
    for bad in (np.zeros((2, 32, 32), np.uint8), np.zeros((2, 28, 28, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"\[N, 28, 28, 1\]"):
            task.embed(params, bad, tokens)
