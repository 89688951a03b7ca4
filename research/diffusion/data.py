"""Image batches for the generative tasks (DDPM, VQ, latent diffusion), and PNG grids.

``ImageBatches`` draws the batch of step ``i`` from a Philox stream keyed on ``(seed, i)``, so its
state is two integers saved with each checkpoint (a resumed run sees the same batches). Images are
float32 NHWC in [-1, 1].
"""
from __future__ import annotations

import os

import numpy as np

DATASETS = ("fashion_mnist",)


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, C] -> float32 NHWC in [-1, 1]."""
    x = np.asarray(images_uint8, np.float32) / 127.5 - 1.0
    return x[..., None] if x.ndim == 3 else x


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float NHWC in [-1, 1] -> uint8 (clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_split(data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 [N, 28, 28, 1] in [-1, 1], labels int32 [N])`` of ``config.data``."""
    from research.core.config import ConfigError
    name = data_config.get("name", "fashion_mnist")
    if name not in DATASETS:
        raise ConfigError(f"config.data.name={name!r}: expected one of {list(DATASETS)}")
    from research.data import fashion_mnist
    images, labels = fashion_mnist.load(split, manual_dir=data_config.get("manual_dir"),
                                        data_dir=data_config.get("data_dir"))
    return to_model_range(images), np.asarray(labels, np.int32)


class ImageBatches:
    """Yields ``{'images': [B, H, W, C] float32, 'labels': [B] int32}`` sampled with replacement."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                 step: int = 0):
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.step = batch_size, seed, step

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, step]))
        idx = rng.integers(0, len(self.images), size=self.batch_size)
        return {"images": self.images[idx], "labels": self.labels[idx]}

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"seed": int(self.seed), "step": int(self.step)}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"Data iterator state has seed {state['seed']}, config has {self.seed}")
        self.step = int(state["step"])


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, num: int) -> list[dict]:
    """The first ``num`` full batches of a split, in order (a fixed evaluation set)."""
    n = min(num, len(images) // batch_size)
    return [{"images": images[i * batch_size:(i + 1) * batch_size],
             "labels": labels[i * batch_size:(i + 1) * batch_size]} for i in range(n)]


def save_grid(images: np.ndarray, path: str, rows: int, scale: int = 2, pad: int = 2) -> str:
    """Write images (float NHWC in [-1, 1], row-major, ``rows`` rows) as one PNG grid."""
    from PIL import Image
    x = to_uint8(images)
    n, h, w, c = x.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    grid = grid[..., 0] if c == 1 else grid
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path
