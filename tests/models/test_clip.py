"""CLIP model and losses: InfoNCE against a NumPy reference, the temperature clamp, SigLIP against
its paper's formula, the text tower's [EOS] pooling, and the global-batch loss on 8 simulated
devices equal to the single-device loss and gradients (in a subprocess: the device count is fixed
per process)."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import clip
from research.models.transformer import TransformerConfig

REPO = Path(__file__).resolve().parents[2]


def np_log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_infonce(img, txt, scale):
    """CLIP paper, Figure 3's pseudocode, in NumPy (float64)."""
    logits = scale * img @ txt.T
    n = len(img)
    loss_i = -np_log_softmax(logits, 1)[np.arange(n), np.arange(n)].mean()
    loss_t = -np_log_softmax(logits, 0)[np.arange(n), np.arange(n)].mean()
    return (loss_i + loss_t) / 2


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_infonce_matches_numpy_reference():
    rng = np.random.default_rng(0)
    img, txt = unit(rng.normal(size=(7, 5))), unit(rng.normal(size=(7, 5)))
    got = clip.infonce_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 14.3)
    np.testing.assert_allclose(float(got), np_infonce(img, txt, 14.3), rtol=1e-5)
    # Perfectly aligned pairs with a large scale: the loss goes to 0.
    e = jnp.eye(4)
    assert float(clip.infonce_loss(e, e, 100.0)) < 1e-6


def test_siglip_matches_paper_formula():
    """SigLIP (Zhai et al. 2023), Algorithm 1, written as an explicit double loop in float64:
    L = -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)), z_ij = 1 if i == j else -1."""
    rng = np.random.default_rng(1)
    img, txt = unit(rng.normal(size=(6, 4))), unit(rng.normal(size=(6, 4)))
    t, b = 10.0, -10.0
    ref = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            ref -= math.log(1 / (1 + math.exp(-z * (t * img[i] @ txt[j] + b))))
    ref /= 6
    got = clip.siglip_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), t, b)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_temperature_clamped_at_100():
    assert float(clip.logit_scale(jnp.log(50.0))) == pytest.approx(50.0, rel=1e-6)
    assert float(clip.logit_scale(jnp.asarray(10.0))) == pytest.approx(100.0, rel=1e-6)
    # Above the clamp the log-scale gets no gradient (it cannot drift further).
    g = jax.grad(lambda s: clip.logit_scale(s))(jnp.asarray(6.0))
    assert float(g) == 0.0
    assert float(jax.grad(lambda s: clip.logit_scale(s))(jnp.asarray(1.0))) == pytest.approx(math.e)


class PixelEncoder(nn.Module):
    """A stand-in image tower for model-level tests: flatten, one Dense layer."""
    width: int = 16

    @nn.compact
    def features(self, images, deterministic=True):
        return nn.Dense(self.width, name="dense")(images.reshape(images.shape[0], -1))


def tiny_model(loss="infonce", causal=True):
    text = TransformerConfig(vocab_size=20, num_layers=1, num_heads=2, embed_dim=16, max_len=8)
    return clip.ClipModel(PixelEncoder(), text, embed_dim=8, loss=loss, text_causal=causal)


def test_model_outputs_unit_vectors_and_initial_temperature():
    model = tiny_model()
    images = jnp.ones((3, 28, 28, 1))
    tokens = jnp.array([[5, 6, 1, 0, 0, 0, 0, 0]] * 3)
    params = model.init(jax.random.key(0), images, tokens)["params"]
    img, txt, scale, bias = model.apply({"params": params}, images, tokens)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1, rtol=1e-5)
    assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5) and bias is None
    sig = tiny_model("siglip")
    p = sig.init(jax.random.key(0), images, tokens)["params"]
    _, _, scale, bias = sig.apply({"params": p}, images, tokens)
    assert float(scale) == pytest.approx(10.0, rel=1e-5) and float(bias) == -10.0


@pytest.mark.parametrize("causal", [True, False])
def test_text_pooled_at_eos_and_padding_ignored(causal):
    """Changing tokens after [EOS] (padding) changes nothing; the pooled vector is read at the
    [EOS] position, wherever it is."""
    model = tiny_model(causal=causal)
    images = jnp.ones((2, 28, 28, 1))
    a = jnp.array([[5, 6, 7, 1, 0, 0, 0, 0], [4, 1, 0, 0, 0, 0, 0, 0]])
    b = jnp.array([[5, 6, 7, 1, 9, 9, 0, 0], [4, 1, 3, 3, 3, 0, 0, 0]])
    params = model.init(jax.random.key(0), images, a)["params"]
    enc = lambda t: model.apply({"params": params}, t, method="encode_text")  # noqa: E731
    if causal:  # under the causal mask later tokens cannot reach [EOS] at all
        np.testing.assert_allclose(enc(a), enc(b), atol=1e-6)
    else:  # bidirectional: the padding mask must hide the [PAD] keys; rewrite only pads as pads
        c = a.at[0, 5].set(0)
        np.testing.assert_allclose(enc(a), enc(c), atol=1e-6)
    assert not np.allclose(enc(a)[1], enc(a.at[1, 0].set(8))[1])


EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    assert jax.device_count() == 8, jax.devices()
    from research.models import clip
    from tests.models.test_clip import tiny_model

    for kind in ("infonce", "siglip"):
        model = tiny_model(kind)
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.normal(size=(32, 28, 28, 1)), jnp.float32)
        tokens = jnp.asarray(np.concatenate(
            [rng.integers(3, 20, (32, 5)), np.ones((32, 1)), np.zeros((32, 2))], 1), jnp.int32)
        params = model.init(jax.random.key(0), images, tokens)["params"]

        def loss_fn(p, images, tokens):
            img, txt, scale, bias = model.apply({"params": p}, images, tokens)
            return clip.contrastive_loss(kind, img, txt, scale, bias)

        single = jax.jit(jax.value_and_grad(loss_fn))
        l1, g1 = single(params, images, tokens)
        mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
        batch = NamedSharding(mesh, P("data"))
        repl = NamedSharding(mesh, P())
        im8, tk8 = jax.device_put(images, batch), jax.device_put(tokens, batch)
        p8 = jax.device_put(params, repl)
        assert len(im8.sharding.device_set) == 8
        sharded = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(repl, batch, batch))
        l8, g8 = sharded(p8, im8, tk8)
        # The global-batch loss is not the mean of per-device losses: check that it differs.
        if kind == "infonce":
            jit_loss = jax.jit(loss_fn)
            local = np.mean([float(jit_loss(params, images[i:i + 4], tokens[i:i + 4]))
                             for i in range(0, 32, 4)])
            assert abs(local - float(l1)) > 1e-3, (local, float(l1))
        np.testing.assert_allclose(float(l8), float(l1), rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g8, g1)

        if kind == "infonce":  # the explicit shard_map + all_gather version
            def sm_loss(p, images, tokens):
                img, txt, scale, _ = model.apply({"params": p}, images, tokens)
                return clip.infonce_loss_shard_map(img, txt, scale, mesh, "data")
            ls, gs = jax.jit(jax.value_and_grad(sm_loss), in_shardings=(repl, batch, batch))(
                p8, im8, tk8)
            np.testing.assert_allclose(float(ls), float(l1), rtol=1e-5)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         gs, g1)
    print("OK")
""")


def test_global_batch_loss_on_8_devices_equals_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
