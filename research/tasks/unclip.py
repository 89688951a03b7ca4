"""DALL-E 2 / unCLIP (Ramesh et al. 2022) on Fashion-MNIST (task ``unclip``): a diffusion prior
from CLIP text embeddings to CLIP image embeddings, and a pixel diffusion decoder conditioned on
the image embedding. Both train together in one run (their losses summed); the CLIP model is
frozen.

- CLIP: ``config.clip.workdir`` (a trained ``clip`` run), or ``config.clip.untrained=True``: a
  randomly initialised CLIP of ``configs/clip_fashion_mnist.py:smoke`` (smoke runs only).
- Prior (``research.models.prior``): diffusion over the normalised image embedding, predicting x0,
  conditioned on the caption's text embedding (cosine schedule, ``config.prior_diffusion``).
- Decoder: the U-Net of ``research.models.unet`` over pixels with the image embedding as its one
  cross-attention token (also added to the time embedding). The embedding is replaced by zeros
  with probability ``p_uncond`` = 0.1 in training (the paper's 10% embedding dropout), so sampling
  can use classifier-free guidance on it.
- Sampling a prompt: CLIP text embedding -> prior (DDIM) -> renormalised image embedding ->
  decoder (DDIM with guidance) -> images.

Metrics: ``val/loss`` (= ``val/prior_loss`` + ``val/decoder_loss``) and ``val/prior_cosine`` (the
cosine between the prior's one-shot x0 prediction and the true image embedding, at random t).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError
from research.data import captions as cap
from research.diffusion import data as data_lib
from research.diffusion import guidance, samplers, schedules
from research.models.clip import l2_normalize
from research.models.prior import DiffusionPrior, PriorConfig, x0_to_eps
from research.models.unet import UNet, UNetConfig, count_params
from research.tasks.base import Task
from research.tasks.ddpm import IMAGE_SHAPE, NUM_CLASSES, check_sample_settings, diffusion_settings
from research.tasks.ldm import CaptionedImages


def load_frozen_clip(c):
    """(ClipTask, params) from ``config.clip`` (or a dict with ``workdir``, ``untrained``)."""
    import flax.linen as nn

    from research.tasks.clip import ClipTask, load_clip
    if c.get("workdir"):
        task, params, _ = load_clip(c.workdir)
        return task, params
    if c.get("untrained", False):
        from configs.clip_fashion_mnist import get_config
        task = ClipTask(get_config("smoke"), splits={})
        return task, nn.meta.unbox(task.init(jax.random.key(c.get("seed", 0))))
    raise ConfigError("config.clip.workdir is not set: unCLIP needs a trained CLIP (python -m "
                      "research.launch --config configs/clip_fashion_mnist.py --workdir DIR; then "
                      "--config.clip.workdir=DIR), or config.clip.untrained=True for a smoke run.")


def drop_embedding(emb: jax.Array, rng: jax.Array, p: float) -> jax.Array:
    """Each row of ``emb`` [B, E] replaced by zeros with probability ``p`` (the decoder's
    embedding dropout, 10% in the paper, that classifier-free guidance needs)."""
    keep = ~jax.random.bernoulli(rng, p, (emb.shape[0], 1))
    return emb * keep


class UnclipTask(Task):
    name = "unclip"

    def __init__(self, config, load_data: bool = True):
        self.config = config
        self.diffusion = diffusion_settings(config)
        self.schedule = schedules.make_schedule(self.diffusion["schedule"], self.diffusion["num_steps"])
        pd = config.prior_diffusion
        self.prior_schedule = schedules.make_schedule(pd.get("schedule", "cosine"),
                                                      pd.get("num_steps", 1000))
        self.prior_steps = int(pd.get("sample_steps", 50))
        check_sample_settings(config.sample, self.diffusion["num_steps"])
        self.clip_task, self.clip_params = load_frozen_clip(config.clip)
        self.tokenizer = self.clip_task.tokenizer
        self.embed_dim = int(self.clip_task.config.model.embed_dim)
        try:
            self.prior_config = PriorConfig(embed_dim=self.embed_dim, **config.prior.to_dict())
            self.model_config = UNetConfig.from_dict(config.model.to_dict(), num_classes=None,
                                                     image_size=IMAGE_SHAPE[0],
                                                     in_channels=IMAGE_SHAPE[-1])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.model / config.prior: {e}") from None
        self.prior = DiffusionPrior(self.prior_config)
        self.unet = UNet(self.model_config)
        self._splits = {}
        if load_data:
            for s in ("train", "test"):
                images, labels = data_lib.load_split(config.data, s)
                self._splits[s] = (images, labels,
                                   cap.image_attributes(data_lib.to_uint8(images)[..., 0]))
        self.n_params = count_params(jax.eval_shape(self.init, jax.random.key(0)))
        self._sample_fns = {}

    # -- CLIP embeddings (frozen) -----------------------------------------------------------------
    def clip_embed(self, images, tokens):
        """(image_emb, text_emb) [B, E], unit norm; images in [-1, 1]."""
        pixels = (jnp.asarray(images)[..., 0] + 1.0) * 127.5
        img, txt, _, _ = self.clip_task.embed(self.clip_params, pixels, tokens)
        return jax.lax.stop_gradient(img), jax.lax.stop_gradient(txt)

    def text_embed(self, tokens):
        m = self.clip_task.model
        return jax.lax.stop_gradient(m.apply({"params": self.clip_params}, tokens,
                                             method=type(m).encode_text))

    # -- the Task interface -----------------------------------------------------------------------
    def init(self, rng):
        p_rng, u_rng = jax.random.split(rng)
        e = jnp.zeros((1, self.embed_dim))
        return {"prior": self.prior.init(p_rng, e, jnp.zeros((1,), jnp.int32), e)["params"],
                "decoder": self.unet.init({"params": u_rng}, jnp.zeros((1, *IMAGE_SHAPE)),
                                          jnp.zeros((1,), jnp.int32), context=e[:, None])["params"]}

    def decoder_apply(self, params, x, t, emb, train=False, rng=None):
        return self.unet.apply({"params": params["decoder"]}, x, t, context=emb[:, None],
                               deterministic=not train,
                               rngs={"dropout": rng} if train and rng is not None else None)

    def prior_apply(self, params, z, t, txt, train=False, rng=None):
        return self.prior.apply({"params": params["prior"]}, z, t, txt, deterministic=not train,
                                rngs={"dropout": rng} if train and rng is not None else None)

    def loss(self, params, batch, rng, train: bool = True):
        img, txt = self.clip_embed(batch["images"], batch["tokens"])
        p_rng, d_rng, drop_rng, t_rng, n_rng = jax.random.split(rng, 5)
        # prior: x0-prediction MSE on the image embedding
        t = jax.random.randint(t_rng, (img.shape[0],), 0, self.prior_schedule.num_steps)
        z_t = schedules.q_sample(self.prior_schedule, img, t, jax.random.normal(n_rng, img.shape))
        x0 = self.prior_apply(params, z_t, t, txt, train, p_rng)
        prior_loss = jnp.mean(jnp.sum(jnp.square(x0 - img), -1))
        cosine = jnp.mean(jnp.sum(l2_normalize(x0) * img, -1))
        # decoder: epsilon MSE, the image embedding dropped to zeros 10% of the time
        emb = drop_embedding(img, drop_rng, self.diffusion["p_uncond"]) if train else img
        apply_fn = lambda x, tt: self.decoder_apply(params, x, tt, emb, train, d_rng)  # noqa: E731
        dec_loss, _ = schedules.diffusion_loss(self.schedule, self.diffusion["prediction"],
                                               apply_fn, batch["images"], jax.random.fold_in(d_rng, 1))
        loss = prior_loss + dec_loss
        return loss, {"loss": loss, "prior_loss": prior_loss, "decoder_loss": dec_loss,
                      "prior_cosine": cosine}

    def train_data(self, seed: int, batch_size: int):
        images, labels, attrs = self._split("train")
        return CaptionedImages(images, labels, attrs, self.tokenizer, batch_size, seed)

    def eval_batches(self, batch_size: int) -> list:
        images, labels, attrs = self._split("test")
        it = CaptionedImages(images, labels, attrs, self.tokenizer, batch_size, seed=12345)
        return [it.batch_at(i) for i in range(self.config.eval_batches)]

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model_config),
                "prior": dataclasses.asdict(self.prior_config), "diffusion": self.diffusion,
                "clip": self.config.clip.get("workdir") or "untrained"}

    def _split(self, split: str):
        if split not in self._splits:
            raise RuntimeError("This UnclipTask was built without data (load_data=False).")
        return self._splits[split]

    # -- sampling ---------------------------------------------------------------------------------
    def prompts_for(self, labels) -> list[str]:
        out = []
        for y in labels:
            if isinstance(y, str):
                out.append(y)
            elif not 0 <= int(y) < NUM_CLASSES:
                raise ValueError(f"label {int(y)} is out of range: expected 0..{NUM_CLASSES - 1}")
            else:
                out.append(cap.fill("a photo of {obj}.", cap.CLASS_PHRASES[int(y)]))
        return out

    def sample(self, params, labels, rng, *, sampler: str = "ddim", steps: int = 50,
               guidance_scale: float = 3.0, eta: float = 0.0, batch_size: int = 256,
               x_init=None, start_index: int = 0):
        """Images [N, 28, 28, 1]: prompt -> text emb -> prior -> image emb -> decoder."""
        tokens = self.tokenizer.encode_batch(self.prompts_for(labels))
        scale = guidance.check_guidance_scale(guidance_scale)
        key = (sampler, steps, scale, float(eta), start_index, x_init is None)
        if key not in self._sample_fns:
            def run(params, tokens, rng, x_init):
                p_rng, d_rng = jax.random.split(rng)
                txt = self.text_embed(tokens)
                prior_fn = lambda z, t: x0_to_eps(  # noqa: E731
                    self.prior_schedule, z, t, self.prior_apply(params, z, t, txt))
                img = samplers.sample(prior_fn, self.prior_schedule, "epsilon", txt.shape, p_rng,
                                      sampler="ddim", steps=self.prior_steps, clip=False)
                img = l2_normalize(img)

                def denoise(x, t):
                    if scale == 1.0:
                        return self.decoder_apply(params, x, t, img)
                    out = self.decoder_apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                             jnp.concatenate([img, jnp.zeros_like(img)]))
                    cond, uncond = jnp.split(out, 2)
                    return guidance.cfg_combine(cond, uncond, scale)
                return samplers.sample(denoise, self.schedule, self.diffusion["prediction"],
                                       (tokens.shape[0], *IMAGE_SHAPE), d_rng, sampler=sampler,
                                       steps=steps, eta=eta, clip=self.diffusion["clip_sample"],
                                       x_init=x_init, start_index=start_index)
            self._sample_fns[key] = jax.jit(run)
        fn = self._sample_fns[key]
        out = []
        for i in range(0, len(tokens), batch_size):
            init = None if x_init is None else jnp.asarray(x_init[i:i + batch_size])
            out.append(np.asarray(fn(params, jnp.asarray(tokens[i:i + batch_size]),
                                     jax.random.fold_in(rng, i), init)))
        return np.concatenate(out)

    def evaluate(self, params, step: int, workdir: str | None = None) -> dict:
        s = self.config.sample
        labels = np.repeat(np.arange(NUM_CLASSES), s.get("per_class", 4))
        images = self.sample(params, labels, jax.random.key(step), sampler=s.get("sampler", "ddim"),
                             steps=s.get("steps", 50), guidance_scale=s.get("guidance", 3.0))
        if workdir is not None and jax.process_index() == 0:
            data_lib.save_grid(images, os.path.join(workdir, f"samples_{step}.png"), rows=NUM_CLASSES)
        return {}
