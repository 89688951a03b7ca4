"""Latent diffusion (Rombach et al. 2022) on Fashion-MNIST with text conditioning (task ``ldm``).

The U-Net of ``research.models.unet`` denoises the latents of a trained VQ autoencoder (task
``vq``) instead of pixels, with cross-attention to the text embeddings of generated captions
(``research.data.captions``: "a photo of a small dark sandal."):

- Latents: the quantized latents ``z_q`` of the autoencoder, shifted and scaled to unit variance
  (Stable Diffusion's ``scale_factor``). The shift and scale are the mean and standard deviation of
  the codebook vectors weighted by their EMA usage counts (the distribution of ``z_q`` the
  autoencoder saw in training), so no data pass is needed to rebuild them. Sampled latents are
  un-scaled, snapped to the codebook and decoded.
- Text: ``config.text.encoder = 'clip'`` reads the final hidden states [B, L, W] of the text tower
  of a trained ``clip`` run (``config.text.clip_workdir``; frozen), as Stable Diffusion reads
  CLIP's (``clip_untrained=True``: a random CLIP, for tests); ``'trainable'`` trains the same
  ``TextEncoder`` architecture from scratch with the U-Net.
- Classifier-free guidance: the caption is replaced by the empty caption (only ``[EOS]``) with
  probability ``p_uncond`` in training; sampling combines both predictions with scale w.
- Image-to-image (SDEdit): ``encode`` maps images to scaled latents; ``research.diffusion.img2img``
  noises them to the strength and denoises with DDIM; ``sample`` decodes.

Config keys read here: ``config.vq`` (``workdir`` of a ``vq`` run, or ``untrained=True`` and
``model`` = ``VQConfig`` fields: a randomly initialised autoencoder, for smoke runs),
``config.model`` (``UNetConfig`` fields; ``image_size`` and ``in_channels`` must equal the VQ
latent shape), ``config.text`` (``encoder``, ``clip_workdir``, ``model``: the trainable tower's
``TransformerConfig`` fields + ``causal``), ``config.diffusion``, ``config.sample``
(as the ``ddpm`` task), ``config.data``, ``config.eval_batches``.
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError
from research.data import captions as cap
from research.diffusion import data as data_lib
from research.diffusion import guidance, samplers, schedules
from research.models import vqvae as vq
from research.models.clip import TextEncoder
from research.models.transformer import TransformerConfig
from research.models.unet import UNet, UNetConfig, count_params
from research.tasks.base import Task
from research.tasks.ddpm import IMAGE_SHAPE, NUM_CLASSES, check_sample_settings, diffusion_settings

TEXT_ENCODERS = ("clip", "trainable")


def text_sequence(encoder: TextEncoder, params, tokens):
    """The text tower's final hidden states [B, L, W] (what its pooled output is read from)."""
    name = "final_norm" if encoder.cfg.norm_position == "pre" else f"layer_{encoder.cfg.num_layers - 1}"
    _, inter = encoder.apply({"params": params}, tokens, mutable=["intermediates"],
                             capture_intermediates=lambda mdl, _: mdl.name == name)
    out = inter["intermediates"][name]["__call__"][0]
    return out[0] if isinstance(out, tuple) else out


def latent_stats(codebook) -> tuple[np.ndarray, float]:
    """(shift [D], scale): usage-weighted mean of the codes and 1 / their standard deviation."""
    emb = np.asarray(codebook["embedding"], np.float64)
    w = np.maximum(np.asarray(codebook["ema_count"], np.float64), 0.0)
    w = w / w.sum() if w.sum() > 0 else np.full_like(w, 1.0 / len(w))
    mean = (w[:, None] * emb).sum(0)
    var = (w[:, None] * (emb - mean) ** 2).sum(0).mean()
    return mean.astype(np.float32), float(1.0 / np.sqrt(max(var, 1e-12)))


class CaptionedImages(data_lib.ImageBatches):
    """``ImageBatches`` plus a caption per image (a training template, the image's attributes),
    drawn from ``Philox(seed, step)``: ``{'images', 'labels', 'tokens'}``."""

    def __init__(self, images, labels, attrs, tokenizer, batch_size, seed, step: int = 0):
        super().__init__(images, labels, batch_size, seed, step)
        self.attrs, self.tokenizer = attrs, tokenizer

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, step]))
        idx = rng.integers(0, len(self.images), size=self.batch_size)
        texts = cap.random_captions(self.labels[idx], self.attrs[0][idx], self.attrs[1][idx], rng)
        return {"images": self.images[idx], "labels": self.labels[idx],
                "tokens": self.tokenizer.encode_batch(texts)}


class LDMTask(Task):
    name = "ldm"

    def __init__(self, config, load_data: bool = True):
        self.config = config
        self.diffusion = diffusion_settings(config)
        self.schedule = schedules.make_schedule(self.diffusion["schedule"], self.diffusion["num_steps"])
        check_sample_settings(config.sample, self.diffusion["num_steps"])
        self._load_vq(config)
        self.latent_shape = self.vq_config.latent_shape(IMAGE_SHAPE[0])
        try:
            # image_size / in_channels default to the latent shape; given, they are checked.
            model = {"image_size": self.latent_shape[0], "in_channels": self.latent_shape[2],
                     **config.model.to_dict()}
            self.model_config = UNetConfig.from_dict(model, num_classes=None)
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None
        unet_shape = (self.model_config.image_size, self.model_config.image_size,
                      self.model_config.in_channels)
        if unet_shape != tuple(self.latent_shape):
            raise ConfigError(
                f"The VQ autoencoder ({self.vq_source}) gives latents of shape "
                f"{tuple(self.latent_shape)} but the latent U-Net config expects {unet_shape} "
                f"(config.model.image_size={self.model_config.image_size}, "
                f"config.model.in_channels={self.model_config.in_channels}); set "
                f"config.model.image_size={self.latent_shape[0]} and "
                f"config.model.in_channels={self.latent_shape[2]}, or use a matching VQ checkpoint.")
        self.unet = UNet(self.model_config)
        self.tokenizer = cap.CaptionTokenizer.build(max_len=config.text.get("max_len", 16))
        self._build_text(config.text)
        self.null_tokens = self.tokenizer.encode_batch([""])[0]
        self._splits = {}
        if load_data:
            for s in ("train", "test"):
                images, labels = data_lib.load_split(config.data, s)
                attrs = cap.image_attributes(data_lib.to_uint8(images)[..., 0])
                self._splits[s] = (images, labels, attrs)
        self.n_params = count_params(jax.eval_shape(self.init, jax.random.key(0)))
        self._sample_fns = {}

    # -- construction -----------------------------------------------------------------------------
    def _load_vq(self, config):
        v = config.vq
        if v.get("workdir"):
            from research.tasks.vq import load_vq
            self.vq_config, self.vq_params, _ = load_vq(v.workdir)
            self.vq_source = f"checkpoint {v.workdir}"
        elif v.get("untrained", False):
            try:
                self.vq_config = vq.VQConfig.from_dict(v.model.to_dict(), in_channels=IMAGE_SHAPE[-1])
            except ValueError as e:
                raise ConfigError(f"config.vq.model: {e}") from None
            self.vq_params = vq.VQVAE(self.vq_config).init(
                jax.random.key(v.get("seed", 0)), jnp.zeros((1, *IMAGE_SHAPE)))["params"]
            self.vq_source = "an untrained autoencoder (config.vq.untrained)"
        else:
            raise ConfigError("config.vq.workdir is not set: latent diffusion needs a trained VQ "
                              "autoencoder (python -m research.launch --config "
                              "configs/vqvae_fashion_mnist.py --workdir DIR; then "
                              "--config.vq.workdir=DIR), or config.vq.untrained=True for a smoke run.")
        self.vq_model = vq.VQVAE(self.vq_config)
        self.shift, self.scale = latent_stats(self.vq_params["quantizer"])

    def _build_text(self, t):
        kind = t.get("encoder", "trainable")
        if kind not in TEXT_ENCODERS:
            raise ConfigError(f"config.text.encoder={kind!r}: expected one of {list(TEXT_ENCODERS)}")
        self.text_kind = kind
        if kind == "clip":
            if not t.get("clip_workdir") and not t.get("clip_untrained", False):
                raise ConfigError("config.text.encoder='clip' needs config.text.clip_workdir (a "
                                  "trained clip run's workdir); or use encoder='trainable'.")
            from research.tasks.unclip import load_frozen_clip
            clip_task, clip_params = load_frozen_clip(
                {"workdir": t.get("clip_workdir"), "untrained": t.get("clip_untrained", False)})
            self.tokenizer = clip_task.tokenizer
            m = clip_task.model
            self.text_encoder = TextEncoder(m.text_cfg, causal=m.text_causal, eos_id=m.eos_id,
                                            pad_id=m.pad_id)
            self.text_params = clip_params["text_encoder"]
        else:
            d = dict(t.model.to_dict())
            causal = bool(d.pop("causal", True))
            try:
                cfg = TransformerConfig.from_dict(d, vocab_size=self.tokenizer.vocab_size,
                                                  max_len=self.tokenizer.max_len)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config.text.model: {e}") from None
            self.text_encoder = TextEncoder(cfg, causal=causal)
            self.text_params = None

    # -- the Task interface -----------------------------------------------------------------------
    def init(self, rng):
        u_rng, t_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, self.tokenizer.max_len), jnp.int32).at[:, 0].set(1)
        params = {}
        if self.text_params is None:
            params["text"] = self.text_encoder.init(t_rng, tokens)["params"]
        ctx = jax.eval_shape(lambda p: self._context(p, tokens), params)
        params["unet"] = self.unet.init({"params": u_rng}, jnp.zeros((1, *self.latent_shape)),
                                        jnp.zeros((1,), jnp.int32),
                                        context=jnp.zeros(ctx.shape, ctx.dtype))["params"]
        return params

    def _context(self, params, tokens):
        tp = params["text"] if self.text_params is None else self.text_params
        ctx = text_sequence(self.text_encoder, tp, tokens)
        return ctx if self.text_params is None else jax.lax.stop_gradient(ctx)

    def apply(self, params, z, t, tokens, train: bool = False, rng=None):
        return self.unet.apply({"params": params["unet"]}, z, t,
                               context=self._context(params, tokens), deterministic=not train,
                               rngs={"dropout": rng} if train and rng is not None else None)

    def encode(self, params, images):
        """Images [N, 28, 28, 1] in [-1, 1] -> scaled latents [N, *latent_shape]."""
        z_e = self.vq_model.apply({"params": self.vq_params}, jnp.asarray(images),
                                  method=vq.VQVAE.encode)
        z_q, _ = self.vq_model.apply({"params": self.vq_params}, z_e, method=vq.VQVAE.quantize)
        return (z_q - self.shift) * self.scale

    def decode(self, z):
        return self.vq_model.apply({"params": self.vq_params}, z / self.scale + self.shift,
                                   method=vq.VQVAE.decode)

    def loss(self, params, batch, rng, train: bool = True):
        drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 3)
        tokens = batch["tokens"]
        if train and self.diffusion["p_uncond"] > 0:
            drop = jax.random.bernoulli(drop_rng, self.diffusion["p_uncond"], (tokens.shape[0], 1))
            tokens = jnp.where(drop, jnp.asarray(self.null_tokens)[None], tokens)
        z0 = self.encode(params, batch["images"])
        apply_fn = lambda z, t: self.apply(params, z, t, tokens, train, dropout_rng)  # noqa: E731
        loss, _ = schedules.diffusion_loss(self.schedule, self.diffusion["prediction"], apply_fn,
                                           z0, loss_rng)
        return loss, {"loss": loss}

    def trainable(self, params):
        return jax.tree.map(lambda _: True, params)

    def train_data(self, seed: int, batch_size: int):
        images, labels, attrs = self._split("train")
        return CaptionedImages(images, labels, attrs, self.tokenizer, batch_size, seed)

    def eval_batches(self, batch_size: int) -> list:
        images, labels, attrs = self._split("test")
        it = CaptionedImages(images, labels, attrs, self.tokenizer, batch_size, seed=12345)
        return [it.batch_at(i) for i in range(self.config.eval_batches)]

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model_config),
                "diffusion": self.diffusion, "vq": dataclasses.asdict(self.vq_config),
                "text": self.text_kind, "tokenizer": self.tokenizer.to_json()}

    def _split(self, split: str):
        if split not in self._splits:
            raise RuntimeError("This LDMTask was built without data (load_data=False); it can "
                               "sample but not train or evaluate.")
        return self._splits[split]

    # -- sampling ---------------------------------------------------------------------------------
    def prompts_for(self, labels) -> list[str]:
        """Class ids -> "a photo of a {class}." prompts; strings pass through."""
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
               x_init=None, start_index: int = 0, decode: bool = True):
        """Images [N, 28, 28, 1] for ``labels`` (class ids or prompt strings); ``x_init``: scaled
        latents to start from at the chain's ``start_index`` (image-to-image)."""
        tokens = self.tokenizer.encode_batch(self.prompts_for(labels))
        scale = guidance.check_guidance_scale(guidance_scale)
        key = (sampler, steps, scale, float(eta), start_index, x_init is None, decode)
        if key not in self._sample_fns:
            def run(params, tokens, rng, x_init):
                def denoise(z, t):
                    if scale == 1.0:
                        return self.apply(params, z, t, tokens)
                    null = jnp.broadcast_to(jnp.asarray(self.null_tokens), tokens.shape)
                    out = self.apply(params, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                                     jnp.concatenate([tokens, null]))
                    cond, uncond = jnp.split(out, 2)
                    return guidance.cfg_combine(cond, uncond, scale)
                z = samplers.sample(denoise, self.schedule, self.diffusion["prediction"],
                                    (tokens.shape[0], *self.latent_shape), rng, sampler=sampler,
                                    steps=steps, eta=eta, clip=False, x_init=x_init,
                                    start_index=start_index)
                return self.decode(z) if decode else z
            self._sample_fns[key] = jax.jit(run)
        fn = self._sample_fns[key]
        out = []
        for i in range(0, len(tokens), batch_size):
            init = None if x_init is None else jnp.asarray(x_init[i:i + batch_size])
            out.append(np.asarray(fn(params, jnp.asarray(tokens[i:i + batch_size]),
                                     jax.random.fold_in(rng, i), init)))
        return np.concatenate(out)

    def evaluate(self, params, step: int, workdir: str | None = None) -> dict:
        """Writes ``samples_<step>.png`` (a row per class prompt) into ``workdir``."""
        s = self.config.sample
        labels = np.repeat(np.arange(NUM_CLASSES), s.get("per_class", 4))
        images = self.sample(params, labels, jax.random.key(step), sampler=s.get("sampler", "ddim"),
                             steps=s.get("steps", 50), guidance_scale=s.get("guidance", 3.0),
                             eta=s.get("eta", 0.0))
        if workdir is not None and jax.process_index() == 0:
            data_lib.save_grid(images, os.path.join(workdir, f"samples_{step}.png"), rows=NUM_CLASSES)
        return {}


def unbox(params):
    return nn.meta.unbox(params)
