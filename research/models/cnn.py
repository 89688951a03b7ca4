"""A small convolutional classifier for 28 x 28 images (Fashion-MNIST), with ``features``.

``Cnn(cfg)``: images [N, H, W, C] (or [N, H, W] when ``channels == 1``), normalised floats ->
for each width in ``cfg.widths``: two 3x3 ``same`` convolutions with ReLU, then 2x2 max-pooling;
flatten; ``hidden`` (Dense ``cfg.hidden`` + ReLU) = ``features`` [N, hidden]; dropout; ``head`` ->
logits [N, num_classes] (float32). No batch norm, so parameters are the whole state.

``features`` is the penultimate layer, the representation a trained classifier offers to sample-
quality metrics (a Frechet distance between feature statistics, as FID uses Inception's pool
features) and to linear probes. Use only through pure init/apply::

    model = Cnn(CnnConfig.from_dict(config.model.to_dict()))
    logits = model.apply({"params": params}, images)
    feats = model.apply({"params": params}, images, method="features")
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.core.config import ConfigError
from research.models.vit import check_images
from research.nn.layers import logical


@dataclasses.dataclass(frozen=True)
class CnnConfig:
    image_size: int = 28
    channels: int = 1
    widths: tuple[int, ...] = (32, 64)   # one stage per width: 2 convs + 2x2 max-pool
    hidden: int = 128                    # the feature width
    dropout: float = 0.0                 # before the head
    num_classes: int = 10

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))
        pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
        checks = {
            "image_size": (pos_int(self.image_size)
                           and self.image_size % (2 ** len(self.widths)) == 0,
                           f"a positive multiple of 2**len(widths) = {2 ** len(self.widths)}"),
            "channels": (pos_int(self.channels), "a positive int"),
            "widths": (len(self.widths) > 0 and all(pos_int(w) for w in self.widths),
                       "a non-empty tuple of positive ints"),
            "hidden": (pos_int(self.hidden), "a positive int"),
            "dropout": (0.0 <= self.dropout < 1.0, "in [0, 1)"),
            "num_classes": (pos_int(self.num_classes), "a positive int"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"config.model.{key}={getattr(self, key)!r} is invalid: "
                                  f"expected {expected}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> "CnnConfig":
        d = {k: v for k, v in {**dict(d), **overrides}.items() if k != "name"}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"Unknown config.model keys {sorted(unknown)} for the CNN; known: "
                              f"{sorted(fields)}")
        return cls(**d)


class Cnn(nn.Module):
    cfg: CnnConfig

    def setup(self):
        cfg = self.cfg
        conv = lambda w, name: nn.Conv(  # noqa: E731
            w, (3, 3), padding="SAME", name=name,
            kernel_init=logical(nn.initializers.he_normal(), (None, None, None, "mlp")),
            bias_init=logical(nn.initializers.zeros, ("mlp",)))
        self.convs = [(conv(w, f"conv_{i}a"), conv(w, f"conv_{i}b"))
                      for i, w in enumerate(cfg.widths)]
        self.hidden = nn.Dense(cfg.hidden, name="hidden",
                               kernel_init=logical(nn.initializers.he_normal(), (None, "embed")),
                               bias_init=logical(nn.initializers.zeros, ("embed",)))
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Dense(cfg.num_classes, name="head",
                             kernel_init=logical(nn.initializers.lecun_normal(), ("embed", None)),
                             bias_init=logical(nn.initializers.zeros, (None,)))

    def features(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """Images -> the penultimate activations [N, hidden] (after the ReLU)."""
        x = check_images(images, self.cfg.image_size, self.cfg.channels, "The CNN")
        x = x.astype(jnp.float32)
        for conv_a, conv_b in self.convs:
            x = nn.relu(conv_b(nn.relu(conv_a(x))))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.relu(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """Images -> class logits [N, num_classes] (float32)."""
        h = self.dropout(self.features(images, deterministic), deterministic=deterministic)
        return self.head(h).astype(jnp.float32)


def flops_per_image(cfg: CnnConfig) -> float:
    """Training FLOPs per image (forward + backward = 3 x forward, 2 per multiply-add)."""
    size, c_in, macs = cfg.image_size, cfg.channels, 0
    for w in cfg.widths:
        macs += size * size * 9 * (c_in * w + w * w)
        size, c_in = size // 2, w
    macs += size * size * c_in * cfg.hidden + cfg.hidden * cfg.num_classes
    return 6.0 * macs
