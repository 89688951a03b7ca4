"""A noise-aware Fashion-MNIST classifier ``log p(y | x_t, t)`` (task ``noisy_classify``), the
classifier of classifier guidance (Dhariwal & Nichol 2021).

Training images (in [-1, 1], as the DDPM task sees them) are noised by the forward process of the
diffusion schedule: ``t ~ U[0, T)``, ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``, and the model
(``research.models.noisy_classifier``: the U-Net's encoder half with a pooled head) is trained with
cross-entropy on ``(x_t, t)``. In ``loss`` the rng splits as ``t_rng, noise_rng, dropout_rng =
jax.random.split(rng, 3)``; ``t = jax.random.randint(t_rng, (B,), 0, T)``, ``eps =
jax.random.normal(noise_rng, x0.shape)``.

Config keys read here:
- ``config.model``: ``NoisyClassifierConfig`` fields (``num_classes`` comes from the dataset: 10);
- ``config.diffusion``: ``schedule`` ('linear' | 'cosine') and ``num_steps`` (T); they must be those
  of the DDPM run the classifier guides (checked when ``research.sample_images`` loads both);
- ``config.eval_noise_levels``: fractions f of T; eval reports ``accuracy_t<int(f T)>`` at each;
- ``config.data``: ``name`` ('fashion_mnist'), ``manual_dir``, ``data_dir``;
- ``config.eval_batches``: test-set batches evaluated (of ``eval_batch_size``; 10000 / size = all).

Eval metrics (``val/...``): ``loss`` and ``accuracy`` at t ~ U[0, T) (fixed draws), and
``accuracy_t<t>`` at each fixed noise level (the same noise). ``load_noisy_classifier(workdir)``
returns a trained run's ``log_prob(x_t, t)``; ``guidance_wrapper`` turns it into the
``denoise_wrapper`` that ``DDPMTask.sample`` takes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.core.config import ConfigError
from research.diffusion import data as data_lib
from research.diffusion import guidance, schedules
from research.models.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from research.models.unet import count_params
from research.tasks.base import Task

NUM_CLASSES = 10  # Fashion-MNIST
IMAGE_SHAPE = (28, 28, 1)


def diffusion_settings(config) -> dict:
    d = config.diffusion
    out = dict(schedule=d.get("schedule", "cosine"), num_steps=d.get("num_steps", 1000))
    if out["schedule"] not in schedules.KINDS:
        raise ConfigError(f"config.diffusion.schedule={out['schedule']!r}: expected one of "
                          f"{list(schedules.KINDS)}")
    if not isinstance(out["num_steps"], int) or out["num_steps"] < 2:
        raise ConfigError(f"config.diffusion.num_steps={out['num_steps']!r}: expected an int >= 2")
    return out


def noise_levels(config, num_steps: int) -> list[int]:
    fracs = list(config.get("eval_noise_levels", (0.0, 0.25, 0.5, 0.75)))
    if not all(isinstance(f, (int, float)) and 0.0 <= f < 1.0 for f in fracs):
        raise ConfigError(f"config.eval_noise_levels={fracs!r}: expected fractions of T in [0, 1)")
    return sorted({int(f * num_steps) for f in fracs})


class NoisyClassifyTask(Task):
    name = "noisy_classify"

    def __init__(self, config, load_data: bool = True):
        self.config = config
        self.diffusion = diffusion_settings(config)
        self.schedule = schedules.make_schedule(self.diffusion["schedule"],
                                                self.diffusion["num_steps"])
        self.levels = noise_levels(config, self.diffusion["num_steps"])
        try:
            self.model_config = NoisyClassifierConfig.from_dict(
                config.model.to_dict(), num_classes=NUM_CLASSES, image_size=IMAGE_SHAPE[0],
                in_channels=IMAGE_SHAPE[-1])
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None
        self.model = NoisyClassifier(self.model_config)
        self._splits = {}
        if load_data:
            self._splits = {s: data_lib.load_split(config.data, s) for s in ("train", "test")}
        self.n_params = count_params(jax.eval_shape(self.init, jax.random.key(0)))
        self.tokens_per_example = 1  # "tok/s" in the progress line = images/s

    def init(self, rng):
        return self.model.init({"params": rng}, jnp.zeros((1, *IMAGE_SHAPE)),
                               jnp.zeros((1,), jnp.int32))["params"]

    def apply(self, params, x_t, t, train: bool = False, rng=None):
        return self.model.apply({"params": params}, x_t, t, deterministic=not train,
                                rngs={"dropout": rng} if train and rng is not None else None)

    def loss(self, params, batch, rng, train: bool = True):
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        x0, labels = batch["images"], batch["labels"]
        t = jax.random.randint(t_rng, (x0.shape[0],), 0, self.schedule.num_steps)
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        logits = self.apply(params, schedules.q_sample(self.schedule, x0, t, noise), t, train,
                            dropout_rng)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}
        if not train:  # the same images and noise at each fixed noise level
            for level in self.levels:
                t_k = jnp.full_like(t, level)
                out = self.apply(params, schedules.q_sample(self.schedule, x0, t_k, noise), t_k)
                metrics[f"accuracy_t{level}"] = (out.argmax(-1) == labels).mean()
        return loss, metrics

    def train_data(self, seed: int, batch_size: int):
        images, labels = self._split("train")
        return data_lib.ImageBatches(images, labels, batch_size, seed)

    def eval_batches(self, batch_size: int) -> list:
        images, labels = self._split("test")
        return data_lib.eval_batches(images, labels, batch_size, self.config.eval_batches)

    def summarize_eval(self, means):
        return {**means, "error": 1.0 - means["accuracy"]} if "accuracy" in means else means

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model_config),
                "diffusion": self.diffusion}

    def _split(self, split: str):
        if split not in self._splits:
            raise RuntimeError("This NoisyClassifyTask was built without data (load_data=False).")
        return self._splits[split]


# -- reuse: classifier guidance --------------------------------------------------------------------
@dataclasses.dataclass
class NoisyClassifierRun:
    """A trained noise-aware classifier: ``log_prob(x_t, t) -> [B, 10]`` log-softmax (jittable)."""

    model: NoisyClassifier
    params: Any
    step: int
    meta: dict

    @property
    def diffusion(self) -> dict:
        return self.meta["diffusion"]

    def log_prob(self, x_t, t):
        return jax.nn.log_softmax(self.model.apply({"params": self.params}, x_t, t))


def load_noisy_classifier(workdir: str, step: int | None = None) -> NoisyClassifierRun:
    """The classifier of a ``noisy_classify`` run's checkpoint in ``workdir`` (the newest, or
    ``step``); ``ConfigError`` naming the problem when there is none or the run is another task."""
    import orbax.checkpoint as ocp

    from research.core import checkpoint as ckpt_lib

    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if os.path.isdir(ckdir) else []
    if not steps:
        raise ConfigError(f"no checkpoint in {ckdir}: train a noise-aware classifier there first: "
                          "python -m research.launch --config "
                          f"configs/noisy_classifier_fashion_mnist.py --workdir {workdir}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ConfigError(f"no checkpoint of step {step} in {ckdir}; there are {steps}")
    ckpt = ckpt_lib.Checkpointer(ckdir, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        if meta.get("task") != NoisyClassifyTask.name:
            raise ConfigError(f"{workdir} is a {meta.get('task')!r} run, not a "
                              f"{NoisyClassifyTask.name!r} run (configs/"
                              "noisy_classifier_fashion_mnist.py trains one)")
        restored = ckpt.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        ckpt.close()
    model = NoisyClassifier(NoisyClassifierConfig.from_dict(meta["model"]))
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored["state"]["params"])
    return NoisyClassifierRun(model, params, step, json.loads(json.dumps(meta)))


def check_same_schedule(classifier_diffusion: dict, ddpm_diffusion: dict) -> None:
    """ConfigError unless the classifier was trained on the DDPM run's noise schedule (kind, T)."""
    keys = ("schedule", "num_steps")
    got = {k: classifier_diffusion.get(k) for k in keys}
    want = {k: ddpm_diffusion.get(k) for k in keys}
    if got != want:
        raise ConfigError(
            f"the classifier was trained on schedule={got['schedule']!r}, num_steps="
            f"{got['num_steps']} but the DDPM run uses schedule={want['schedule']!r}, num_steps="
            f"{want['num_steps']}: train the classifier with --config.diffusion.schedule="
            f"{want['schedule']} --config.diffusion.num_steps={want['num_steps']}")


def guidance_wrapper(classifier: NoisyClassifierRun, schedule, scale: float):
    """``denoise_wrapper(denoise, labels) -> guided denoise`` for ``DDPMTask.sample``:
    ``eps - scale sqrt(1 - ab_t) grad_x log p(labels | x_t, t)``
    (``guidance.classifier_guided``); labels must be classes 0..9, not the null class."""
    def wrap(denoise, labels):
        return guidance.classifier_guided(denoise, classifier.log_prob, schedule, labels, scale)
    return wrap
