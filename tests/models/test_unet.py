"""The U-Net denoiser: output shapes, that labels and a context sequence change the output (and
only for their own example), and input checks."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models.unet import UNet, UNetConfig, timestep_embedding

TINY = dict(base_channels=8, channel_mults=(1, 2), attn_resolutions=(14,), num_heads=2, groups=4,
            context_dim=16)


def _init(cfg, x, **kw):
    params = nn.meta.unbox(UNet(cfg).init(jax.random.key(0), x, jnp.zeros((x.shape[0],), jnp.int32),
                                          **kw)["params"])
    # The output conv is zero-initialised (the U-Net starts as the zero function): perturb every
    # parameter so that all paths carry signal.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


def test_shapes_28_and_32_with_context():
    """Shapes: 28x28 x 1 is checked in the test below (same model); here 3 channels at 32x32 with
    labels (incl. the null class 10) and a context sequence together, in one cheap model (narrow
    widths, two levels, jitted: one XLA compile each instead of op-by-op dispatch)."""
    cfg3 = UNetConfig(num_classes=10, in_channels=3, image_size=32, channel_mults=(1, 2),
                      base_channels=4, attn_resolutions=(16,), num_heads=2, groups=2, context_dim=8)
    x3 = jnp.ones((3, 32, 32, 3))
    ctx = jnp.ones((3, 5, 12))
    m3 = UNet(cfg3)
    t, labels = jnp.array([0, 5, 999]), jnp.array([0, 1, 10])
    p3 = jax.jit(m3.init)(jax.random.key(0), x3, t, labels=labels, context=ctx)
    out = jax.jit(m3.apply)(p3, x3, t, labels=labels, context=ctx)
    assert out.shape == (3, 32, 32, 3) and out.dtype == jnp.float32


def test_conditioning_changes_the_output_per_example():
    cfg = UNetConfig(num_classes=10, **TINY)
    x = jax.random.normal(jax.random.key(2), (2, 28, 28, 1))
    t = jnp.array([10, 10])
    params = _init(cfg, x, labels=jnp.zeros((2,), jnp.int32))
    f = lambda labels: np.asarray(UNet(cfg).apply({"params": params}, x, t, labels=jnp.array(labels)))  # noqa: E731
    a, b = f([3, 4]), f([3, 7])
    assert a.shape == (2, 28, 28, 1) and a.dtype == np.float32
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)      # example 0 keeps its label: same output
    assert np.abs(a[1] - b[1]).max() > 1e-3                 # example 1's label changed its output
    assert np.abs(f([3, 10])[1] - a[1]).max() > 1e-3        # the null class is a condition too
    # a context sequence (text embeddings later) reaches the output through cross-attention
    cfg_c = UNetConfig(**TINY)
    ctx = jax.random.normal(jax.random.key(3), (2, 4, 12))
    pc = _init(cfg_c, x, context=ctx)
    g = lambda c: np.asarray(UNet(cfg_c).apply({"params": pc}, x, t, context=c))  # noqa: E731
    assert np.abs(g(ctx) - g(ctx.at[:, 1].set(0.0))).max() > 1e-3
    # and the time step does too
    assert np.abs(f([3, 4]) - np.asarray(UNet(cfg).apply(
        {"params": params}, x, jnp.array([500, 500]), labels=jnp.array([3, 4])))).max() > 1e-3


def test_timestep_embedding_is_sinusoidal():
    e = np.asarray(timestep_embedding(jnp.array([0, 7]), 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    np.testing.assert_allclose(e[1], np.concatenate([np.cos(7 * freqs), np.sin(7 * freqs)]), rtol=1e-5)
    np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="cannot be halved"):
        UNetConfig(image_size=28, channel_mults=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="GroupNorm"):
        UNetConfig(base_channels=12, groups=8)
    cfg = UNetConfig(num_classes=10, **TINY)
    with pytest.raises(ValueError, match=r"expected \[B, 28, 28, 1\]"):
        UNet(cfg).init(jax.random.key(0), jnp.ones((1, 32, 32, 1)), jnp.zeros((1,), jnp.int32),
                       labels=jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="class-conditional"):
        UNet(cfg).init(jax.random.key(0), jnp.ones((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
