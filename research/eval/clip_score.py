"""CLIP score of generated images (CLIPScore, Hessel et al. 2021) with the project's CLIP.

``clip_score(image_embeds, text_embeds, w=2.5)``: the mean over pairs of
``w * max(cos(image, text), 0)`` (the paper's CLIP-S; w = 2.5 rescales the cosines a CLIP model
gives, and negative cosines count as 0). The embeddings need not be normalised (the cosine is
scale-invariant); ``text_embeds`` is [N, D] (row i pairs with image i) or [D] (one for all).

``ClipScorer`` wraps a trained ``clip`` run (``ClipScorer.from_workdir(DIR)``, loaded by
``research.tasks.clip.load_clip``) for images made by the diffusion models, float NHWC in [-1, 1]
(``research.diffusion.data``):

- ``embed_images``: quantised to uint8 as the saved PNG would be (``data.to_uint8``), then the
  CLIP task's own preprocessing and image tower (``ClipTask.features``: /255, then the training
  set's pixel mean and std);
- ``image_embed_fn()``: the same mapping without quantisation, differentiable, for CLIP guidance
  (``research.diffusion.clip_guidance``): pixels ``(x + 1) * 127.5`` on the 0..255 scale, then
  ``ClipTask._images`` (eval mode) and ``encode_image``;
- ``embed_texts(texts)``: the run's caption tokenizer and text tower;
- ``class_embeds(labels)``: each class's zero-shot embedding, CLIP's prompt ensemble over the
  *held-out* caption templates (``ClipTask.class_embeddings``), i.e. the held-out captions of the
  class averaged; ``class_captions(labels)`` gives one held-out caption per class instead;
- ``score(images, texts=None, labels=None)``: CLIP-S of the images against captions, or against
  their classes' held-out prompt ensembles.

Note: ``load_clip`` rebuilds the ``ClipTask`` with its dataset (for its evaluation splits), so
loading a CLIP workdir reads Fashion-MNIST once.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError
from research.data import captions as cap

DEFAULT_W = 2.5


def _cosines(image_embeds, text_embeds) -> jax.Array:
    img = jnp.asarray(image_embeds, jnp.float32)
    txt = jnp.asarray(text_embeds, jnp.float32)
    if img.ndim != 2:
        raise ValueError(f"image_embeds: expected [N, D]; got shape {img.shape}")
    if txt.ndim == 1:
        txt = jnp.broadcast_to(txt, img.shape) if txt.shape[0] == img.shape[1] else txt[None]
    if txt.shape != img.shape:
        raise ValueError(f"text_embeds of shape {txt.shape} do not pair with image_embeds of "
                         f"shape {img.shape}: expected [N, D] (row i pairs with image i) or [D]")
    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return jnp.sum(unit(img) * unit(txt), axis=-1)


def clip_scores(image_embeds, text_embeds, w: float = DEFAULT_W) -> np.ndarray:
    """Per-pair ``w * max(cos, 0)`` [N]."""
    return np.asarray(w * jnp.maximum(_cosines(image_embeds, text_embeds), 0.0), np.float64)


def clip_score(image_embeds, text_embeds, w: float = DEFAULT_W) -> float:
    """CLIP-S (Hessel et al. 2021): ``mean_i w * max(cos(image_i, text_i), 0)``."""
    s = clip_scores(image_embeds, text_embeds, w)
    if s.size == 0:
        raise ValueError("clip_score of no images")
    return float(s.mean())


def class_captions(labels, template: str = cap.HELD_OUT_TEMPLATES[0]) -> list[str]:
    """One held-out-template caption per class label (0..9), e.g. 'a blurry photo of a coat.'."""
    out = []
    for y in np.asarray(labels).reshape(-1).tolist():
        if not 0 <= int(y) < len(cap.CLASS_PHRASES):
            raise ValueError(f"label {y} is out of range: expected 0..{len(cap.CLASS_PHRASES) - 1}")
        out.append(cap.fill(template, cap.CLASS_PHRASES[int(y)]))
    return out


class ClipScorer:
    """A trained CLIP (``ClipTask`` and its params) applied to diffusion samples in [-1, 1]."""

    def __init__(self, task: Any, params: Any, step: int | None = None):
        self.task, self.params, self.step = task, params, step
        self._encode_text = jax.jit(lambda p, t: task.model.apply(
            {"params": p}, t, method="encode_text"))

    @classmethod
    def from_workdir(cls, workdir: str, option: str = "clip workdir") -> "ClipScorer":
        """Load a ``clip`` run's newest checkpoint. A workdir that is not a trained CLIP run is a
        ConfigError whose message starts with ``option=workdir`` (the CLI passes its flag)."""
        from research.tasks.clip import load_clip

        fix = ("point it at a trained CLIP run's workdir (python -m research.launch --config "
               "configs/clip_fashion_mnist.py --workdir DIR)")
        config_path = os.path.join(workdir, "config.json")
        if not os.path.exists(config_path):
            raise ConfigError(f"{option}={workdir!r} has no config.json: {fix}")
        with open(config_path) as f:
            kind = json.load(f).get("task")
        if kind != "clip":
            raise ConfigError(f"{option}={workdir!r} is a {kind!r} run, not a 'clip' run: {fix}")
        try:
            task, params, step = load_clip(workdir)
        except ConfigError as e:
            raise ConfigError(f"{option}={workdir!r}: {e} ({fix})") from None
        return cls(task, params, step)

    # -- embeddings -------------------------------------------------------------------------------
    def image_embed_fn(self):
        """Differentiable ``images [B, 28, 28, 1] in [-1, 1] -> unit embeddings [B, D]``."""
        task, params = self.task, self.params

        def embed(x):
            pixels = (jnp.asarray(x, jnp.float32) + 1.0) * 127.5   # the 0..255 scale CLIP reads
            return task.model.apply({"params": params}, task._images(pixels, None, False),
                                    method="encode_image")
        return embed

    def embed_images(self, images) -> np.ndarray:
        """Images in [-1, 1] [N, 28, 28, 1] -> [N, D], quantised to uint8 first (the PNG)."""
        from research.diffusion import data as data_lib
        return self.task.features(self.params, data_lib.to_uint8(images))[1]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.task.tokenizer.encode_batch(list(texts))
        return np.asarray(self._encode_text(self.params, jnp.asarray(tokens)))

    def class_embeds(self, labels=None) -> np.ndarray:
        """[10, D] held-out prompt-ensemble class embeddings, or their rows for ``labels``."""
        if not hasattr(self, "_class_table"):
            # The ten diffusion classes in label order (a run's zero_shot.classes may differ).
            self._class_table = np.asarray(jax.jit(lambda p: self.task.class_embeddings(
                p, class_names=cap.CLASS_PHRASES))(self.params))
        if labels is None:
            return self._class_table
        labels = np.asarray(labels, np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self._class_table)):
            raise ValueError(f"labels {labels.tolist()}: expected classes in "
                             f"0..{len(self._class_table) - 1}")
        return self._class_table[labels]

    def score(self, images, texts: Sequence[str] | str | None = None, labels=None,
              w: float = DEFAULT_W) -> float:
        """CLIP-S of ``images`` (in [-1, 1]) against ``texts`` (one per image, or one string for
        all) or, with ``labels``, against each image's class (held-out prompt ensemble)."""
        if (texts is None) == (labels is None):
            raise ValueError("ClipScorer.score: give exactly one of texts and labels")
        if labels is not None:
            txt = self.class_embeds(labels)
        else:
            txt = self.embed_texts([texts] if isinstance(texts, str) else texts)
            txt = txt[0] if isinstance(texts, str) else txt
        return clip_score(self.embed_images(images), txt, w)
