"""The ``classify`` task (research/tasks/classify.py): the checkpointable epoch iterator, exact
test-set accuracy over padded batches, augmentation, config errors, and one launcher run of
configs/vit_fashion_mnist.py:smoke on the real Fashion-MNIST files (plus the launcher's clean
error when the data is missing)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError, sibling_config
from research.tasks import classify
from tests import e2e

CONFIG = "configs/vit_fashion_mnist.py"


def synthetic(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


def smoke_config(**model):
    config = sibling_config(str(e2e.REPO / CONFIG), "vit_fashion_mnist").get_config("smoke")
    config.model.update(model)
    return config


def test_epoch_batches_cover_each_epoch_and_resume_exactly():
    images, labels = synthetic(10)
    it = classify.EpochBatches(images, labels, batch_size=4, seed=3)
    idx = np.concatenate([it.indices_at(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
    assert not np.array_equal(idx[:10], idx[10:])  # a new permutation each epoch
    batches = [next(it) for _ in range(3)]
    np.testing.assert_array_equal(batches[2]["images"], images[idx[8:12]])  # straddles epochs
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = classify.EpochBatches(images, labels, batch_size=4, seed=3)
    resumed.set_state(json.loads(json.dumps(state)))  # as saved with a checkpoint
    for a, b in zip(expected, [next(resumed) for _ in range(4)]):
        np.testing.assert_array_equal(a["labels"], b["labels"])
    other = classify.EpochBatches(images, labels, batch_size=4, seed=4)
    assert not np.array_equal(other.indices_at(0), it.indices_at(0))
    with pytest.raises(ValueError, match="seed 3, config has 4"):
        other.set_state(state)


def test_eval_accuracy_is_exact_over_padded_batches():
    """Reference: argmax of the model's logits over all examples at once, in numpy."""
    train, test = synthetic(40, 0), synthetic(23, 1)
    task = classify.ClassifyTask(smoke_config(), splits={"train": train, "test": test})
    params = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(1), x.shape),
                          jax.jit(task.init)(jax.random.key(0)))
    batches = task.eval_batches(10)
    assert len(batches) == 3 and batches[-1]["mask"].sum() == 3
    metrics = [jax.device_get(task.loss(params, b, jax.random.key(0), False)[1]) for b in batches]
    means = {k: np.mean([m[k] for m in metrics]) for k in metrics[0]}  # as the loop averages
    out = task.summarize_eval(means)
    x = classify.standardize(classify.preprocess(test[0]))
    logits = np.asarray(task.model.apply({"params": params}, x))
    ce = -jax.nn.log_softmax(logits)[np.arange(23), test[1]]
    assert out["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == test[1]), abs=1e-6)
    assert out["loss"] == pytest.approx(float(np.mean(ce)), rel=1e-5)
    assert 0.0 < out["accuracy"] < 1.0 and out["error"] == pytest.approx(1 - out["accuracy"])


def test_augment_translates_and_flips():
    x = classify.preprocess(synthetic(8)[0])
    assert classify.augment(x, jax.random.key(0)) is x  # nothing asked, nothing done
    flipped = classify.augment(x, jax.random.key(0), flip=True)
    is_flip = [bool(jnp.all(f == i[:, ::-1])) for f, i in zip(flipped, x)]
    is_same = [bool(jnp.all(f == i)) for f, i in zip(flipped, x)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and any(is_flip) and any(is_same)
    p = 2
    cropped = np.asarray(classify.augment(x, jax.random.key(1), crop_pad=p))
    padded = np.pad(np.asarray(x), ((0, 0), (p, p), (p, p), (0, 0)))
    for c, img in zip(cropped, padded):  # each output is a 28 x 28 window of the padded image
        assert any(np.array_equal(c, img[i:i + 28, j:j + 28])
                   for i in range(2 * p + 1) for j in range(2 * p + 1))


def test_config_errors_name_the_key():
    splits = {"train": synthetic(8), "test": synthetic(8)}
    with pytest.raises(ConfigError, match=r"config.model.name='resnet': expected one of \['vit', "
                                          r"'cnn'\]"):
        classify.ClassifyTask(smoke_config(name="resnet"), splits=splits)
    config = smoke_config()
    config.data.name = "mnist"
    with pytest.raises(ConfigError, match="config.data.name='mnist'"):
        classify.ClassifyTask(config, splits=splits)
    config = sibling_config(str(e2e.REPO / "configs/cnn_fashion_mnist.py"),
                            "cnn_fashion_mnist").get_config("smoke")
    config.model.widths = (4, 0)
    with pytest.raises(ConfigError, match=r"config.model.widths=\(4, 0\)"):
        classify.ClassifyTask(config, splits=splits)


def test_launcher_smoke_run(fashion_mnist_env, tmp_path):
    workdir = tmp_path / "vit"
    proc = e2e.launch(workdir, config=f"{CONFIG}:smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    rows = e2e.metrics_rows(workdir)
    evals = [r for r in rows if "val/accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0.0 <= r["val/accuracy"] <= 1.0 and np.isfinite(r["val/loss"]) for r in evals)
    assert e2e.finished_steps(workdir) == [3, 6]
    assert classify.plot_accuracy(str(workdir)) == str(workdir / "accuracy.png")
    assert (workdir / "accuracy.png").stat().st_size > 0
    # The trained classifier, reloaded from the checkpoint, reproduces the run's test accuracy.
    clf = classify.load_classifier(str(workdir))
    from research.data import fashion_mnist
    images, labels = fashion_mnist.load("test")
    assert clf.step == 6 and clf.features(images[:5]).shape == (5, 16)
    accuracy = float(np.mean(clf.predict(images) == labels))
    assert accuracy == pytest.approx(evals[-1]["val/accuracy"], abs=1e-4)


def test_launcher_reports_missing_data_cleanly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = e2e.subprocess_env(RESEARCH_DATA_DIR=str(tmp_path / "tfds"))
    env.pop("RESEARCH_FASHION_MNIST_DIR", None)
    proc = e2e.launch(tmp_path / "w", f"--config.data.manual_dir={empty}",
                      "--config.data.download=False", config=f"{CONFIG}:smoke", env=env)
    e2e.assert_clean_error(proc, "DataNotFoundError: Fashion-MNIST not found", str(empty),
                           "apt-get install dataset-fashion-mnist", "config.data.manual_dir")


def test_load_classifier_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="No checkpoint in .*train a classifier there first"):
        classify.load_classifier(str(tmp_path))
