"""Class-conditional denoising diffusion (DDPM) on Fashion-MNIST with classifier-free guidance.

Config keys read here:
- ``config.model``: ``UNetConfig`` fields (``num_classes`` comes from the dataset: 10);
- ``config.diffusion``: ``schedule`` ('linear' | 'cosine'), ``num_steps`` (T, 1000),
  ``prediction`` ('epsilon' | 'v'), ``p_uncond`` (probability the label is replaced by the null
  class in training, 0.1), ``clip_sample`` (clip the predicted x0 to [-1, 1] when sampling);
- ``config.sample``: the eval-time sample grid: ``sampler`` ('ddim' | 'ddpm'), ``steps``, ``eta``,
  ``guidance`` (w), ``per_class`` (grid columns; one row per class);
- ``config.data``: ``name`` ('fashion_mnist'), ``manual_dir``, ``data_dir``;
- ``config.eval_batches``: test-set batches for ``val/loss`` (the diffusion loss at fixed t, noise).

The loss is the mean squared error of the epsilon (or v) prediction at t ~ U[0, T). ``evaluate``
(called with a workdir) writes ``samples_<step>.png``: one row per class, ``per_class`` samples
each, DDIM with guidance.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError
from research.diffusion import data as data_lib
from research.diffusion import guidance, samplers, schedules
from research.models.unet import UNet, UNetConfig, count_params
from research.tasks.base import Task

NUM_CLASSES = 10  # Fashion-MNIST
IMAGE_SHAPE = (28, 28, 1)


def diffusion_settings(config) -> dict:
    d = config.diffusion
    out = dict(schedule=d.get("schedule", "cosine"), num_steps=d.get("num_steps", 1000),
               prediction=d.get("prediction", "epsilon"), p_uncond=d.get("p_uncond", 0.1),
               clip_sample=d.get("clip_sample", True))
    if out["schedule"] not in schedules.KINDS:
        raise ConfigError(f"config.diffusion.schedule={out['schedule']!r}: expected one of "
                          f"{list(schedules.KINDS)}")
    if out["prediction"] not in schedules.PREDICTIONS:
        raise ConfigError(f"config.diffusion.prediction={out['prediction']!r}: expected one of "
                          f"{list(schedules.PREDICTIONS)}")
    if not isinstance(out["num_steps"], int) or out["num_steps"] < 2:
        raise ConfigError(f"config.diffusion.num_steps={out['num_steps']!r}: expected an int >= 2")
    if not 0.0 <= out["p_uncond"] < 1.0:
        raise ConfigError(f"config.diffusion.p_uncond={out['p_uncond']!r}: expected 0 <= p < 1")
    return out


def check_sample_settings(s, num_train_steps: int, prefix: str = "config.sample") -> None:
    if s.get("sampler", "ddim") not in samplers.SAMPLERS:
        raise ConfigError(f"{prefix}.sampler={s.get('sampler')!r}: expected one of "
                          f"{list(samplers.SAMPLERS)}")
    steps = s.get("steps", 50)
    if not isinstance(steps, int) or not 1 <= steps <= num_train_steps:
        raise ConfigError(f"{prefix}.steps={steps!r}: expected 1..{num_train_steps}")
    try:
        guidance.check_guidance_scale(s.get("guidance", 3.0), f"{prefix}.guidance")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0.0 <= s.get("eta", 0.0) <= 1.0:
        raise ConfigError(f"{prefix}.eta={s.get('eta')!r}: expected 0 <= eta <= 1")


class DDPMTask(Task):
    name = "ddpm"

    def __init__(self, config, load_data: bool = True):
        self.config = config
        self.diffusion = diffusion_settings(config)
        self.schedule = schedules.make_schedule(self.diffusion["schedule"], self.diffusion["num_steps"])
        check_sample_settings(config.sample, self.diffusion["num_steps"])
        try:
            self.model_config = UNetConfig.from_dict(config.model.to_dict(), num_classes=NUM_CLASSES,
                                                     image_size=IMAGE_SHAPE[0],
                                                     in_channels=IMAGE_SHAPE[-1])
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None
        self.model = UNet(self.model_config)
        self.null_id = NUM_CLASSES
        self._splits = {}
        if load_data:
            self._splits = {s: data_lib.load_split(config.data, s) for s in ("train", "test")}
        self.n_params = count_params(jax.eval_shape(self.init, jax.random.key(0)))
        self.tokens_per_example = 1  # "tok/s" in the progress line = images/s
        self._sample_fns = {}

    # -- the Task interface -----------------------------------------------------------------------
    def init(self, rng):
        x = jnp.zeros((1, *IMAGE_SHAPE))
        return self.model.init({"params": rng}, x, jnp.zeros((1,), jnp.int32),
                               labels=jnp.zeros((1,), jnp.int32))["params"]

    def apply(self, params, x, t, labels, train: bool = False, rng=None):
        return self.model.apply({"params": params}, x, t, labels=labels, deterministic=not train,
                                rngs={"dropout": rng} if train and rng is not None else None)

    def loss(self, params, batch, rng, train: bool = True):
        drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 3)
        labels = batch["labels"]
        if train and self.diffusion["p_uncond"] > 0:
            labels = guidance.drop_condition(labels, drop_rng, self.diffusion["p_uncond"], self.null_id)
        apply_fn = lambda x_t, t: self.apply(params, x_t, t, labels, train, dropout_rng)  # noqa: E731
        loss, _ = schedules.diffusion_loss(self.schedule, self.diffusion["prediction"], apply_fn,
                                           batch["images"], loss_rng)
        return loss, {"loss": loss}

    def train_data(self, seed: int, batch_size: int):
        images, labels = self._split("train")
        return data_lib.ImageBatches(images, labels, batch_size, seed)

    def eval_batches(self, batch_size: int) -> list:
        images, labels = self._split("test")
        return data_lib.eval_batches(images, labels, batch_size, self.config.eval_batches)

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model_config),
                "diffusion": self.diffusion}

    def evaluate(self, params, step: int, workdir: str | None = None) -> dict:
        """Writes ``samples_<step>.png`` (a row per class) into ``workdir``; returns metrics."""
        s = self.config.sample
        labels = np.repeat(np.arange(NUM_CLASSES), s.get("per_class", 4))
        images = self.sample(params, labels, jax.random.key(step), sampler=s.get("sampler", "ddim"),
                             steps=s.get("steps", 50), guidance_scale=s.get("guidance", 3.0),
                             eta=s.get("eta", 0.0))
        if workdir is not None and jax.process_index() == 0:
            data_lib.save_grid(np.asarray(images), os.path.join(workdir, f"samples_{step}.png"),
                               rows=NUM_CLASSES)
        return {}

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, params, labels, rng, *, sampler: str = "ddim", steps: int = 50,
               guidance_scale: float = 3.0, eta: float = 0.0, batch_size: int = 256,
               x_init=None, start_index: int = 0, denoise_wrapper=None):
        """Images [N, 28, 28, 1] in [-1, 1] for ``labels`` [N] (ints in 0..9, or 10 = null).
        ``denoise_wrapper(denoise, labels) -> denoise``, if given, wraps the (classifier-free
        guided) model inside the jitted chain, e.g. classifier guidance
        (``research.tasks.noisy_classify.guidance_wrapper``)."""
        labels = np.asarray(labels, np.int32)
        if labels.size and (labels.min() < 0 or labels.max() > self.null_id):
            bad = labels[(labels < 0) | (labels > self.null_id)][0]
            raise ValueError(f"label {int(bad)} is out of range: expected 0..{NUM_CLASSES - 1} "
                             f"(or {self.null_id} = unconditional)")
        scale = guidance.check_guidance_scale(guidance_scale)
        key = (sampler, steps, scale, float(eta), start_index, x_init is None, denoise_wrapper)
        if key not in self._sample_fns:
            def run(params, labels, rng, x_init):
                apply_fn = lambda x, t, y: self.apply(params, x, t, y)  # noqa: E731
                denoise = guidance.classifier_free(apply_fn, labels, self.null_id, scale)
                if denoise_wrapper is not None:
                    denoise = denoise_wrapper(denoise, labels)
                return samplers.sample(denoise, self.schedule, self.diffusion["prediction"],
                                       (labels.shape[0], *IMAGE_SHAPE), rng, sampler=sampler,
                                       steps=steps, eta=eta, clip=self.diffusion["clip_sample"],
                                       x_init=x_init, start_index=start_index)
            self._sample_fns[key] = jax.jit(run)
        fn = self._sample_fns[key]
        out = []
        for i in range(0, len(labels), batch_size):
            chunk = jnp.asarray(labels[i:i + batch_size])
            init = None if x_init is None else jnp.asarray(x_init[i:i + batch_size])
            out.append(np.asarray(fn(params, chunk, jax.random.fold_in(rng, i), init)))
        return np.concatenate(out) if out else np.zeros((0, *IMAGE_SHAPE), np.float32)

    def _split(self, split: str):
        if split not in self._splits:
            raise RuntimeError("This DDPMTask was built without data (load_data=False); it can "
                               "sample but not train or evaluate.")
        return self._splits[split]


def unbox(params):
    return nn.meta.unbox(params)
