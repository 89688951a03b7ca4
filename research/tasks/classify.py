"""Supervised image classification on Fashion-MNIST (task ``classify``): a ViT or a small CNN.

Config keys read here:
- ``config.model.name``: 'vit' (``research.models.vit``: ``VitConfig`` + ``TransformerConfig``
  fields) or 'cnn' (``research.models.cnn.CnnConfig`` fields); the other ``config.model`` keys are
  that model's;
- ``config.data``: ``name`` ('fashion_mnist'), ``manual_dir``, ``data_dir``, ``download`` (default
  True), ``crop_pad`` (random translation by up to this many pixels: the image is zero-padded and
  a 28 x 28 window cropped at random; 0 = off), ``flip`` (random horizontal flips);
- ``config.label_smoothing`` (default 0).

Batches hold uint8 images [B, 28, 28] and int32 labels [B]; the loss scales the pixels to [0, 1],
augments (training only, on the device, from the step's rng, so a resumed run sees the same
crops), then standardises with the training set's mean and std (``PIXEL_MEAN``, ``PIXEL_STD``).
Training batches walk through seeded permutations of the 60,000 training images, epoch after
epoch (``EpochBatches``; its state is ``{seed, step}``). Evaluation covers all 10,000 test images
(the last batch padded and masked): ``val/accuracy``, ``val/loss`` (plain cross-entropy) and
``val/error``. ``evaluate(params, step, workdir)`` plots accuracy against steps into
``<workdir>/accuracy.png``.

A trained run's classifier is reusable outside training: ``load_classifier(workdir)`` returns
its ``logits`` and ``features`` (pooled ViT token / CNN penultimate layer) on uint8 images, e.g. for
a Frechet distance between the features of real and generated images.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.core.config import ConfigError
from research.models import cnn as cnn_lib
from research.models import vit as vit_lib
from research.models.transformer import count_params
from research.tasks.base import Task

DATASETS = ("fashion_mnist",)
MODELS = ("vit", "cnn")
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530  # Fashion-MNIST train pixels in [0, 1]
NUM_CLASSES = 10


# -- models -----------------------------------------------------------------------------------------
def build_model(model: Mapping[str, Any]) -> tuple[nn.Module, dict, Any]:
    """``config.model`` as a dict -> ``(module, meta dict that rebuilds it, model config)``."""
    model = dict(model)
    name = model.get("name")
    if name not in MODELS:
        raise ConfigError(f"config.model.name={name!r}: expected one of {list(MODELS)}")
    if name == "vit":
        cfg, vit = vit_lib.vit_configs_from_dict(model)
        t = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("vocab_size", "max_len")}
        return vit_lib.ViT(cfg, vit), {"name": name, **dataclasses.asdict(vit), **t}, (cfg, vit)
    cfg = cnn_lib.CnnConfig.from_dict(model)
    meta = {"name": name, **dataclasses.asdict(cfg), "widths": list(cfg.widths)}
    return cnn_lib.Cnn(cfg), meta, cfg


def preprocess(images: jax.Array) -> jax.Array:
    """Pixels on the 0..255 scale (uint8 or float) [N, H, W(, C)] -> float32 [N, H, W, C] in
    [0, 1]."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return x[..., None] if x.ndim == 3 else x


def standardize(x: jax.Array) -> jax.Array:
    return (x - PIXEL_MEAN) / PIXEL_STD


def augment(x: jax.Array, rng: jax.Array, crop_pad: int = 0, flip: bool = False) -> jax.Array:
    """Random translations (zero-pad by ``crop_pad``, crop back at a random offset) and random
    horizontal flips of images [N, H, W, C] in [0, 1]; one draw per image from ``rng``."""
    n, h, w, c = x.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if crop_pad:
        p = crop_pad
        padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * p + 1)
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(
            padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_rng, 0.5, (n, 1, 1, 1))
        x = jnp.where(flips, x[:, :, ::-1], x)
    return x


# -- data -------------------------------------------------------------------------------------------
class EpochBatches:
    """Batches ``{'images', 'labels'}`` walking through seeded permutations of the examples: epoch
    ``e`` is ``Philox(seed, e).permutation(N)``, concatenated epoch after epoch, and step ``i`` takes
    positions ``[i B, (i + 1) B)`` of that stream (a batch may straddle two epochs). The state is
    ``{seed, step}``, so a resumed run sees exactly the batches of an uninterrupted one."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                 step: int = 0):
        if len(images) != len(labels) or not len(images):
            raise ValueError(f"EpochBatches needs as many images ({len(images)}) as labels "
                             f"({len(labels)}), at least one.")
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.step = batch_size, seed, step
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.Philox(key=[self.seed, epoch]))
            self._perms[epoch] = rng.permutation(len(self.images))
        return self._perms[epoch]

    def indices_at(self, step: int) -> np.ndarray:
        n = len(self.images)
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, offsets = pos // n, pos % n
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices_at(step)
        return {"images": self.images[idx], "labels": self.labels[idx]}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"seed": int(self.seed), "step": int(self.step)}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"Data iterator state has seed {state['seed']}, config has {self.seed}")
        self.step = int(state["step"])


def padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[dict]:
    """All examples in order, in batches of ``batch_size``; the last one padded with zeros and
    ``mask`` False on the padding."""
    out = []
    for start in range(0, len(images), batch_size):
        im, lb = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(im)
        out.append({"images": np.concatenate([im, np.zeros((pad, *im.shape[1:]), im.dtype)]),
                    "labels": np.concatenate([lb, np.zeros(pad, lb.dtype)]),
                    "mask": np.arange(batch_size) < len(im)})
    return out


# -- the task ---------------------------------------------------------------------------------------
class ClassifyTask(Task):
    name = "classify"

    def __init__(self, config, splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        """Loads Fashion-MNIST as ``config.data`` says, unless ``splits`` {'train', 'test'}:
        ``(images uint8 [N, 28, 28], labels int32 [N])`` are given."""
        self.config = config
        data = config.data
        if data.get("name") not in DATASETS:
            raise ConfigError(f"config.data.name={data.get('name')!r}: expected one of "
                              f"{list(DATASETS)}")
        self.crop_pad = data.get("crop_pad", 0)
        self.flip = data.get("flip", False)
        if not (isinstance(self.crop_pad, int) and 0 <= self.crop_pad < 28):
            raise ConfigError(f"config.data.crop_pad={self.crop_pad!r}: expected an int in [0, 28)"
                              " (0 = no random crops).")
        self.label_smoothing = float(config.get("label_smoothing", 0.0) or 0.0)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"config.label_smoothing={self.label_smoothing!r}: expected [0, 1).")
        self.model, self.model_meta, self.model_config = build_model(config.model.to_dict())
        self._splits = dict(splits or {})
        if splits is None:
            from research.data import fashion_mnist
            kwargs = dict(manual_dir=data.get("manual_dir"), data_dir=data.get("data_dir"),
                          download=data.get("download", True))
            self._splits = {s: fashion_mnist.load(s, **kwargs) for s in ("train", "test")}
        self.n_params = count_params(jax.eval_shape(self.init, jax.random.key(0)))
        if self.model_meta["name"] == "vit":
            self.flops_per_example = vit_lib.flops_per_image(*self.model_config, self.n_params)
        else:
            self.flops_per_example = cnn_lib.flops_per_image(self.model_config)
        self.tokens_per_example = 1  # the progress line's "tok/s" is images per second
        self._last_eval: dict[str, float] = {}

    def init(self, rng):
        return self.model.init({"params": rng}, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]

    def loss(self, params, batch, rng, train: bool = True):
        aug_rng, dropout_rng = jax.random.split(rng)
        x = preprocess(batch["images"])
        if train and (self.crop_pad or self.flip):
            x = augment(x, aug_rng, self.crop_pad, self.flip)
        logits = self.model.apply({"params": params}, standardize(x), deterministic=not train,
                                  rngs={"dropout": dropout_rng} if train else None)
        labels = batch["labels"]
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        if train:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]),
                                          self.label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, {"loss": loss, "accuracy": correct.mean()}
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones_like(ce)
        count = mask.sum()
        # Sums, not means: the loop averages per batch, and the ratio of averaged sums is exact
        # over the whole (padded) test set (``summarize_eval``).
        return (ce * mask).sum() / jnp.maximum(count, 1.0), {
            "loss_sum": (ce * mask).sum(), "correct": (correct * mask).sum(), "count": count}

    def train_data(self, seed: int, batch_size: int) -> EpochBatches:
        images, labels = self._split("train")
        return EpochBatches(images, labels, batch_size, seed)

    def eval_batches(self, batch_size: int) -> list:
        return padded_batches(*self._split("test"), batch_size)

    def summarize_eval(self, means):
        count = max(means["count"], 1e-9)
        acc = means["correct"] / count
        out = {"loss": means["loss_sum"] / count, "accuracy": acc, "error": 1.0 - acc}
        self._last_eval = out
        return out

    def evaluate(self, params, step: int, workdir: str | None = None) -> dict:
        """Plots accuracy against steps (``metrics.jsonl`` and the latest evaluation) into
        ``<workdir>/accuracy.png``; returns no extra metrics."""
        if workdir is not None and jax.process_index() == 0:
            extra = {step: self._last_eval["accuracy"]} if "accuracy" in self._last_eval else {}
            plot_accuracy(workdir, extra)
        return {}

    def meta(self) -> dict:
        return {"task": self.name, "model": self.model_meta,
                "pixel_mean_std": [PIXEL_MEAN, PIXEL_STD]}

    def _split(self, split: str):
        if split not in self._splits:
            raise RuntimeError(f"This ClassifyTask was built without the {split!r} split.")
        return self._splits[split]


# -- plots and reuse --------------------------------------------------------------------------------
def plot_accuracy(workdir: str, extra_val: Mapping[int, float] | None = None,
                  filename: str = "accuracy.png") -> str | None:
    """Train (running mean over each log interval) and test accuracy against step, from
    ``<workdir>/metrics.jsonl`` (plus ``extra_val`` {step: accuracy}), saved as a PNG."""
    from research.core.metrics import read_jsonl
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train = dict(sorted((r["step"], r["train/accuracy"]) for r in rows if "train/accuracy" in r))
    val = {r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r}
    val.update(extra_val or {})
    if not train and not val:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(list(train), list(train.values()), "-", label="train (batch) accuracy", alpha=0.6)
    if val:
        pts = sorted(val.items())
        ax.plot(*zip(*pts), "o-", markersize=3, label="test accuracy (10k)")
        best = max(v for _, v in pts)
        ax.axhline(best, color="gray", lw=0.5, ls="--")
        ax.set_title(f"best test accuracy {100 * best:.2f}% (last {100 * pts[-1][1]:.2f}%)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path = os.path.join(workdir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclasses.dataclass
class Classifier:
    """A trained classifier: ``logits`` and ``features`` of images given on the 0..255 scale
    (uint8 or float) as [N, 28, 28] or [N, 28, 28, 1], computed in batches."""

    model: nn.Module
    params: Any
    step: int
    meta: dict

    def __post_init__(self):
        def run(params, images, method):
            x = standardize(preprocess(images))
            return self.model.apply({"params": params}, x, method=method)
        self._logits = jax.jit(lambda p, x: run(p, x, None))
        self._features = jax.jit(lambda p, x: run(p, x, "features"))

    def _batched(self, fn, images, batch_size: int) -> np.ndarray:
        images = np.asarray(images)
        out = [np.asarray(fn(self.params, images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0,))

    def logits(self, images, batch_size: int = 500) -> np.ndarray:
        return self._batched(self._logits, images, batch_size)

    def features(self, images, batch_size: int = 500) -> np.ndarray:
        return self._batched(self._features, images, batch_size)

    def predict(self, images, batch_size: int = 500) -> np.ndarray:
        return self.logits(images, batch_size).argmax(-1)


def load_classifier(workdir: str, step: int | None = None) -> Classifier:
    """The classifier of a ``classify`` run's checkpoint in ``workdir`` (the newest, or ``step``);
    raises ``ConfigError`` naming the problem when there is none."""
    import orbax.checkpoint as ocp

    from research.core import checkpoint as ckpt_lib

    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if os.path.isdir(ckdir) else []
    if not steps:
        raise ConfigError(f"No checkpoint in {ckdir}: train a classifier there first, e.g. "
                          f"python -m research.launch --config configs/cnn_fashion_mnist.py "
                          f"--workdir {workdir}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"No checkpoint of step {step} in {ckdir}; there are {steps}.")
    ckpt = ckpt_lib.Checkpointer(ckdir, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        if meta.get("task") != ClassifyTask.name:
            raise ConfigError(f"{workdir} is a {meta.get('task')!r} run, not a 'classify' run.")
        restored = ckpt.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        ckpt.close()
    model, _, _ = build_model(meta["model"])
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored["state"]["params"])
    return Classifier(model, params, step, json.loads(json.dumps(meta)))
